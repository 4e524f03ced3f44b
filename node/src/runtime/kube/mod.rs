//! The kube runtime: an app's Kubernetes manifests applied to the local
//! K3s through the Kubernetes API.
//!
//! What it owns: the objects it applied and the namespaces it created,
//! nothing else. Every object is applied with server-side apply (field
//! manager `shoal`, forced, `fieldValidation=Strict`), labelled
//! `app.kubernetes.io/managed-by=shoal` and `shoal.dev/app=<app>`, and
//! recorded in the node's data dir ([`inventory`]) *before* it is applied.
//! An app lives in its namespace (`spec.kube.namespace`, default
//! `shoal-<app>`): Shoal creates that namespace only when it does not exist
//! (marked `shoal.dev/created-by=shoal`) and never applies or deletes a
//! namespace it found. Kinds are resolved by API discovery (cached,
//! refreshed on a miss), so CRDs with irregular plurals work; cluster-scoped
//! kinds are refused unless the app sets `spec.kube.allow_cluster_scoped`.
//!
//! What it prunes: objects recorded for an app but no longer in its
//! manifests (compared by group, kind, namespace and name; an object that
//! moved to another apiVersion is the same object and is kept — an alias
//! across groups is recognised by its UID), after every object of the app
//! applied. An app that left the node's share has every recorded object
//! deleted (by UID precondition: an object re-created by someone else
//! under the same name is not touched), then its namespace if Shoal created
//! it and no other app uses it. What cannot be deleted now (API server
//! down, a refusal) stays recorded and is retried every 10 s, across
//! restarts; the report says what is pending.
//!
//! What it watches: per kind and namespace in use, a label-selected watch
//! of Shoal's objects. An object deleted by hand, re-created, or with a
//! field Shoal set changed by another writer (Shoal's managed fields
//! change) is re-applied at once; only that object is patched. An app whose
//! manifests did not change is not patched at all; every 5 minutes
//! everything is re-applied as a backstop.
//!
//! What it reports: the rollout status of Deployments, StatefulSets and
//! DaemonSets as `kubectl rollout status` says it ([`rollout`]), with the
//! version whose rollout last completed (not the one being rolled out).
//! Refusals map to a failed workload with the API server's words (403,
//! 409, 400/422 with the offending field, "no matches for kind … install
//! its CRD first"); an unreachable API server makes every workload
//! `unknown` with the time it went away and the last known state, because
//! the workloads probably still run.

mod inventory;
mod objects;
pub mod rollout;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use crdt_state::model::{RuntimeKind, WorkloadReport, WorkloadState};
use crdt_state::placement::Workload;
use futures::StreamExt;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions,
    ValidationDirective, WatchEvent, WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use inventory::{CREATED_BY, InventoryError, ObjKey};
pub use objects::{APP_LABEL, MANAGED_BY};

use inventory::{AppRecord, ObjRecord, Stored};
use objects::Manifest;
use rollout::Rollout;

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "shoal";

/// How often the kube runtime does what.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Status re-read and pending work retried (default 10 s).
    pub resync: Duration,
    /// Everything re-applied, whatever the watches said: the backstop for
    /// drift no watch reported (default 5 minutes).
    pub reapply: Duration,
    /// How long one request may take before the API server counts as
    /// unreachable; the client itself has no read timeout (default 30 s).
    pub call: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            resync: Duration::from_secs(10),
            reapply: Duration::from_secs(300),
            call: Duration::from_secs(30),
        }
    }
}
/// The first retry after a round that left something failed or pending.
const RETRY: Duration = Duration::from_secs(1);
/// A watch silent for longer than its server-side timeout (290 s) is dead.
const WATCH_SILENCE: Duration = Duration::from_secs(300);
/// Watch events arriving within this window are handled in one round.
const DEBOUNCE: Duration = Duration::from_millis(50);

type Status = Arc<Mutex<BTreeMap<String, WorkloadReport>>>;
/// Objects with what is recorded of them.
type Records = Vec<(ObjKey, ObjRecord)>;

/// The kube runtime.
pub struct Kube {
    desired: watch::Sender<Vec<Workload>>,
    status: Status,
    task: Option<JoinHandle<()>>,
}

/// Picks the TLS crypto provider for the Kubernetes client: the dependency
/// tree enables two (ring for kube, aws-lc-rs for QUIC), so rustls cannot
/// choose by itself. Harmless when one is installed already.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client from a kubeconfig file, or in-cluster then `KUBECONFIG`.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    install_crypto();
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", p.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?,
    };
    Ok(kube::Client::try_from(config)?)
}

impl Kube {
    /// A runtime applying through `client` (see [`client`]), keeping what it
    /// owns in `dir` (the node's `<data-dir>/kube`). Fails on a corrupt
    /// inventory, naming the file, rather than forget what it created.
    pub fn new(client: kube::Client, dir: &Path) -> Result<Kube, InventoryError> {
        Kube::with_timing(client, dir, Timing::default())
    }

    /// [`Kube::new`] with other intervals (tests use short ones).
    pub fn with_timing(
        client: kube::Client,
        dir: &Path,
        timing: Timing,
    ) -> Result<Kube, InventoryError> {
        install_crypto();
        let store = Stored::open(dir)?;
        let (desired, rx) = watch::channel(Vec::new());
        let status: Status = Arc::default();
        let (seen_tx, seen_rx) = mpsc::channel(1024);
        let rec = Reconciler {
            client,
            timing,
            store,
            disco: HashMap::new(),
            live: BTreeMap::new(),
            drifted: BTreeSet::new(),
            watches: BTreeMap::new(),
            seen_tx,
            known_ns: BTreeSet::new(),
            wanted: BTreeSet::new(),
            last: BTreeMap::new(),
            down: None,
            status: status.clone(),
        };
        let task = tokio::spawn(rec.run(rx, seen_rx));
        Ok(Kube {
            desired,
            status,
            task: Some(task),
        })
    }
}

impl super::Runtime for Kube {
    fn reconcile(&mut self, desired: &[Workload]) {
        let _ = self.desired.send(desired.to_vec());
    }

    fn status(&self) -> BTreeMap<String, WorkloadReport> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Kubernetes workloads outlive the node daemon: nothing is stopped.
    fn shutdown(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Some(t) = self.task.take() {
                t.abort();
                let _ = t.await;
            }
        })
    }
}

/// What went wrong, in an operator's words.
pub fn explain(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => match s.code {
            400 => format!("invalid: {}", s.message),
            401 => format!(
                "unauthorized: the kubeconfig's credentials were refused ({})",
                s.message
            ),
            403 => format!("forbidden: {}", s.message),
            404 => format!("not found: {}", s.message),
            409 => format!("conflict: {}", s.message),
            422 => format!("invalid: {}", s.message),
            500 if s.message.contains("field not declared in schema") => {
                format!("invalid: {}", s.message)
            }
            c => format!("API server answered {c}: {}", s.message),
        },
        e if unreachable(e) => format!("Kubernetes API server unreachable: {e}"),
        other => format!("Kubernetes API: {other}"),
    }
}

/// One request, bounded by `limit`: no answer counts as unreachable.
async fn call<T>(
    limit: Duration,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(limit, request).await {
        Ok(r) => r,
        Err(_) => Err(kube::Error::Service(
            format!("no answer within {:?}", limit).into(),
        )),
    }
}

/// Did the request fail because the API server could not be reached?
fn unreachable(e: &kube::Error) -> bool {
    matches!(
        e,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_)
    )
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Why a step failed.
#[derive(Debug)]
enum Fail {
    /// The API server could not be reached: the workloads probably still run.
    Down(String),
    /// The API server refused, or the input is wrong.
    No(String),
}

impl Fail {
    fn of(e: &kube::Error) -> Fail {
        if unreachable(e) {
            Fail::Down(explain(e))
        } else {
            Fail::No(explain(e))
        }
    }

    fn context(self, what: &str) -> Fail {
        match self {
            Fail::Down(m) => Fail::Down(m),
            Fail::No(m) => Fail::No(format!("{what}: {m}")),
        }
    }
}

/// A kind as the cluster serves it.
#[derive(Clone, Debug)]
struct Kind {
    ar: ApiResource,
    namespaced: bool,
}

/// A watch: one kind in one namespace (or cluster-wide for a cluster-scoped kind).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct WatchKey {
    api_version: String,
    kind: String,
    namespace: Option<String>,
}

/// What a watch task saw.
enum Seen {
    Listed(WatchKey, Vec<Value>),
    Put(WatchKey, Value),
    Gone(WatchKey, Value),
    Down(String),
    Up,
}

fn key_of(wk: &WatchKey, obj: &Value) -> Option<ObjKey> {
    Some(ObjKey {
        group: objects::group_of(&wk.api_version).to_string(),
        kind: wk.kind.clone(),
        namespace: obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(String::from),
        name: obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)?
            .into(),
    })
}

fn meta<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

struct Reconciler {
    client: kube::Client,
    timing: Timing,
    store: Stored,
    disco: HashMap<(String, String), Kind>,
    /// The latest copy of every workload object (Deployment, StatefulSet,
    /// DaemonSet) Shoal owns, from watches, apply answers and reads.
    live: BTreeMap<ObjKey, Value>,
    /// Objects someone else changed or deleted: re-applied next round.
    drifted: BTreeSet<ObjKey>,
    watches: BTreeMap<WatchKey, JoinHandle<()>>,
    seen_tx: mpsc::Sender<Seen>,
    /// Namespaces known to exist (or not visible with these credentials).
    known_ns: BTreeSet<String>,
    wanted: BTreeSet<String>,
    /// The last report of each app made while the API server answered.
    last: BTreeMap<String, WorkloadReport>,
    /// Since when, and why, the API server cannot be reached.
    down: Option<(SystemTime, String)>,
    status: Status,
}

/// The outcome of one app's round.
enum Outcome {
    Report(WorkloadReport),
    Down,
}

fn report(state: WorkloadState, reason: Option<String>, version: Option<String>) -> WorkloadReport {
    WorkloadReport {
        state,
        reason,
        restarts: 0,
        version,
    }
}

impl Reconciler {
    async fn run(mut self, mut rx: watch::Receiver<Vec<Workload>>, mut seen: mpsc::Receiver<Seen>) {
        let mut last_full = tokio::time::Instant::now();
        let mut retry = RETRY;
        loop {
            let desired = rx.borrow_and_update().clone();
            let full = last_full.elapsed() >= self.timing.reapply;
            if full {
                last_full = tokio::time::Instant::now();
            }
            let unsettled = self.round(&desired, full).await;
            // What failed (a CRD not installed yet, a refusal, the API
            // server away) is tried again soon, then every `resync`.
            let wait = if unsettled {
                let w = retry;
                retry = (retry * 2).min(self.timing.resync);
                w
            } else {
                retry = RETRY;
                self.timing.resync
            };
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                Some(s) = seen.recv() => {
                    self.on_seen(s);
                    // Take what else arrives at once in the same round.
                    let until = tokio::time::Instant::now() + DEBOUNCE;
                    while let Ok(Some(s)) = tokio::time::timeout_at(until, seen.recv()).await {
                        self.on_seen(s);
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        for (_, w) in std::mem::take(&mut self.watches) {
            w.abort();
        }
    }

    fn save(&mut self) {
        if let Err(e) = self.store.save() {
            tracing::error!(error = %e, "the kube inventory could not be written");
        }
    }

    fn reached(&mut self) {
        if let Some((since, _)) = self.down.take() {
            tracing::info!(since = %utc(since), "Kubernetes API server reachable again");
        }
    }

    fn unreachable_now(&mut self, why: String) {
        if self.down.is_none() {
            tracing::warn!(error = %why, "Kubernetes API server unreachable");
            self.down = Some((SystemTime::now(), why));
        }
    }

    /// An object Shoal owns for an app it still runs.
    fn owned(&self, key: &ObjKey) -> Option<&ObjRecord> {
        self.store
            .inv
            .apps
            .iter()
            .filter(|(a, _)| self.wanted.contains(*a))
            .find_map(|(_, r)| r.objects.get(key))
    }

    fn on_seen(&mut self, s: Seen) {
        match s {
            Seen::Up => self.reached(),
            Seen::Down(why) => self.unreachable_now(why),
            Seen::Put(wk, obj) => self.observe(&wk, obj),
            Seen::Gone(wk, obj) => {
                let Some(key) = key_of(&wk, &obj) else { return };
                self.live.remove(&key);
                if let Some(rec) = self.owned(&key)
                    && (rec.uid.is_none() || rec.uid.as_deref() == meta(&obj, "uid"))
                {
                    tracing::info!(object = %key, "deleted by someone else: re-applying");
                    self.drifted.insert(key);
                }
            }
            Seen::Listed(wk, items) => {
                let mut present = BTreeSet::new();
                for obj in items {
                    if let Some(k) = key_of(&wk, &obj) {
                        present.insert(k);
                    }
                    self.observe(&wk, obj);
                }
                let group = objects::group_of(&wk.api_version);
                let missing: Vec<ObjKey> = self
                    .store
                    .inv
                    .apps
                    .iter()
                    .filter(|(a, _)| self.wanted.contains(*a))
                    .flat_map(|(_, r)| r.objects.iter())
                    .filter(|(k, r)| {
                        k.group == group
                            && k.kind == wk.kind
                            && k.namespace == wk.namespace
                            && r.applied.is_some()
                            && !present.contains(*k)
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in missing {
                    tracing::info!(object = %k, "missing from the cluster: re-applying");
                    self.drifted.insert(k);
                }
            }
        }
    }

    fn observe(&mut self, wk: &WatchKey, obj: Value) {
        let Some(key) = key_of(wk, &obj) else { return };
        let Some(rec) = self.owned(&key) else { return };
        let newer = match (
            meta(&obj, "resourceVersion").and_then(|v| v.parse::<u64>().ok()),
            rec.resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok()),
        ) {
            (Some(seen), Some(ours)) => seen > ours,
            _ => true,
        };
        let recreated = rec.uid.is_some() && rec.uid.as_deref() != meta(&obj, "uid");
        let changed =
            rec.fields.is_some() && objects::owned_fields(&obj, FIELD_MANAGER) != rec.fields;
        if recreated || (newer && changed) {
            tracing::info!(object = %key, recreated, "changed by someone else: re-applying");
            self.drifted.insert(key.clone());
        }
        if rollout::has_rollout(&key.kind) {
            self.live.insert(key, obj);
        }
    }

    async fn resolve(&mut self, api_version: &str, kind: &str) -> Result<Kind, Fail> {
        let k = (api_version.to_string(), kind.to_string());
        if let Some(found) = self.disco.get(&k) {
            return Ok(found.clone());
        }
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let no_match = || {
            Fail::No(format!(
                "no matches for kind \"{kind}\" in version \"{api_version}\": the cluster does not \
                 serve it; install its CRD first"
            ))
        };
        match call(
            self.timing.call,
            kube::discovery::pinned_kind(&self.client, &gvk),
        )
        .await
        {
            Ok((ar, caps)) => {
                self.reached();
                let found = Kind {
                    ar,
                    namespaced: caps.scope == Scope::Namespaced,
                };
                self.disco.insert(k, found.clone());
                Ok(found)
            }
            Err(kube::Error::Discovery(_)) => {
                self.reached();
                Err(no_match())
            }
            Err(e) if code(&e) == Some(404) => {
                self.reached();
                Err(no_match())
            }
            Err(e) => Err(Fail::of(&e)),
        }
    }

    fn api(&self, kind: &Kind, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &kind.ar),
            None => Api::all_with(self.client.clone(), &kind.ar),
        }
    }

    /// One pass over every app: apply what changed or drifted, prune, read
    /// status; remove apps that left; delete namespaces nobody uses.
    /// Returns whether anything is left failed, unknown or pending removal.
    async fn round(&mut self, desired: &[Workload], full: bool) -> bool {
        let mut out = BTreeMap::new();
        let mut wanted = BTreeSet::new();
        let mut watch_keys = BTreeMap::new();
        for w in desired {
            if w.spec.runtime != RuntimeKind::Kube || w.spec.kube.is_none() {
                out.insert(
                    w.app.clone(),
                    report(
                        WorkloadState::Failed,
                        Some("the app runs natively; this node runs the kube runtime".into()),
                        w.spec.version.clone(),
                    ),
                );
                continue;
            }
            wanted.insert(w.app.clone());
        }
        self.wanted = wanted.clone();
        for w in desired.iter().filter(|w| wanted.contains(&w.app)) {
            let r = match self.app_round(w, full, &mut watch_keys).await {
                Outcome::Report(r) => {
                    self.last.insert(w.app.clone(), r.clone());
                    r
                }
                Outcome::Down => self.unknown(&w.app),
            };
            out.insert(w.app.clone(), r);
        }
        let gone: Vec<String> = self
            .store
            .inv
            .apps
            .keys()
            .filter(|a| !wanted.contains(*a))
            .cloned()
            .collect();
        for app in gone {
            if let Some(r) = self.remove_app(&app).await {
                out.insert(app, r);
            } else {
                self.last.remove(&app);
            }
        }
        let mut unsettled = !self.collect_namespaces().await;
        self.save();
        self.keep_watches(watch_keys);
        unsettled |= out.values().any(|r| {
            matches!(
                r.state,
                WorkloadState::Failed | WorkloadState::Unknown | WorkloadState::Stopped
            ) || r
                .reason
                .as_deref()
                .is_some_and(|why| why.contains("pending removal"))
        });
        if let Ok(mut s) = self.status.lock() {
            *s = out;
        }
        unsettled
    }

    /// The report of an app while the API server cannot be reached: stable
    /// words (no ages), so the node's document does not change every round.
    fn unknown(&self, app: &str) -> WorkloadReport {
        let (since, why) = self.down.clone().unwrap_or_else(|| {
            (
                SystemTime::now(),
                "Kubernetes API server unreachable".into(),
            )
        });
        let last = self.last.get(app);
        let known = match last {
            Some(r) => format!(
                "{}{}",
                serde_json::to_value(r.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                r.version
                    .as_ref()
                    .map(|v| format!(" {v}"))
                    .unwrap_or_default()
            ),
            None => "nothing yet".into(),
        };
        report(
            WorkloadState::Unknown,
            Some(format!("{why} (since {}); last known: {known}", utc(since))),
            last.and_then(|r| r.version.clone()),
        )
    }

    async fn app_round(
        &mut self,
        w: &Workload,
        full: bool,
        watch_keys: &mut BTreeMap<WatchKey, Kind>,
    ) -> Outcome {
        let Some(spec) = w.spec.kube.as_ref() else {
            return Outcome::Report(report(WorkloadState::Failed, None, None));
        };
        let version = w.spec.version.clone();
        let app = w.app.as_str();
        let ns = spec
            .namespace
            .clone()
            .unwrap_or_else(|| format!("shoal-{app}"));
        let failed = |reason: String, rec: Option<&AppRecord>| {
            Outcome::Report(report(
                WorkloadState::Failed,
                Some(reason),
                rec.and_then(|r| r.running_version.clone()),
            ))
        };
        let manifests = match objects::parse(&ns, &spec.manifests) {
            Ok(m) => m,
            Err(e) => return failed(e, self.store.inv.apps.get(app)),
        };
        // Resolve every kind before anything is applied.
        let mut want: Vec<(ObjKey, Kind, &Manifest)> = Vec::new();
        for m in &manifests {
            let kind = match self.resolve(&m.api_version, &m.kind).await {
                Ok(k) => k,
                Err(Fail::Down(why)) => {
                    self.unreachable_now(why);
                    return Outcome::Down;
                }
                Err(Fail::No(why)) => {
                    return failed(
                        format!("manifest {}: {} {}: {why}", m.index, m.kind, m.name),
                        self.store.inv.apps.get(app),
                    );
                }
            };
            if !kind.namespaced && !spec.allow_cluster_scoped {
                return failed(
                    format!(
                        "manifest {}: {} {} is cluster-scoped; an app's objects live in its \
                         namespace {ns} (set spec.kube.allow_cluster_scoped: true to allow it)",
                        m.index, m.kind, m.name
                    ),
                    self.store.inv.apps.get(app),
                );
            }
            let key = ObjKey {
                group: m.group().to_string(),
                kind: m.kind.clone(),
                namespace: kind.namespaced.then(|| ns.clone()),
                name: m.name.clone(),
            };
            want.push((key, kind, m));
        }
        for (key, kind, m) in &want {
            watch_keys.insert(
                WatchKey {
                    api_version: m.api_version.clone(),
                    kind: m.kind.clone(),
                    namespace: key.namespace.clone(),
                },
                kind.clone(),
            );
        }
        // A new app: adopt what an earlier Shoal (or a lost data dir) left
        // labelled as this app's, so pruning still finds it.
        if !self.store.inv.apps.contains_key(app) {
            let mut found = BTreeMap::new();
            let listed: BTreeMap<WatchKey, Kind> = want
                .iter()
                .map(|(k, kind, m)| {
                    (
                        WatchKey {
                            api_version: m.api_version.clone(),
                            kind: m.kind.clone(),
                            namespace: k.namespace.clone(),
                        },
                        kind.clone(),
                    )
                })
                .collect();
            for (wk, kind) in listed {
                let api = self.api(&kind, wk.namespace.as_deref());
                match call(
                    self.timing.call,
                    api.list(&ListParams::default().labels(&objects::selector(Some(app)))),
                )
                .await
                {
                    Ok(list) => {
                        for item in list.items {
                            let obj = serde_json::to_value(&item).unwrap_or(Value::Null);
                            if let Some(k) = key_of(&wk, &obj) {
                                found.insert(
                                    k,
                                    ObjRecord {
                                        api_version: wk.api_version.clone(),
                                        uid: item.metadata.uid.clone(),
                                        ..ObjRecord::default()
                                    },
                                );
                            }
                        }
                    }
                    Err(e) if unreachable(&e) => {
                        self.unreachable_now(explain(&e));
                        return Outcome::Down;
                    }
                    // Not allowed to list: adopt nothing, apply anyway.
                    Err(e) => tracing::debug!(%app, error = %explain(&e), "adoption list"),
                }
            }
            if !found.is_empty() {
                tracing::info!(%app, objects = found.len(), "adopted objects labelled as this app's");
            }
            self.store.inv.apps.insert(
                app.to_string(),
                AppRecord {
                    namespace: ns.clone(),
                    objects: found,
                    running_version: None,
                },
            );
        }
        let prepared: Vec<(ObjKey, Kind, &Manifest, Value, String)> = want
            .into_iter()
            .map(|(key, kind, m)| {
                let body = m.prepared(app, key.namespace.as_deref());
                let h = objects::hash(&body);
                (key, kind, m, body, h)
            })
            .collect();
        let need: Vec<usize> = {
            let rec = self.store.inv.apps.get(app);
            prepared
                .iter()
                .enumerate()
                .filter(|(_, (key, _, _, _, h))| {
                    full || self.drifted.contains(key)
                        || rec
                            .and_then(|r| r.objects.get(key))
                            .and_then(|o| o.applied.as_ref())
                            != Some(h)
                })
                .map(|(i, _)| i)
                .collect()
        };
        let mut errors = Vec::new();
        if !need.is_empty() {
            // Record first: whatever happens next, Shoal knows it may have
            // made these.
            if let Some(rec) = self.store.inv.apps.get_mut(app) {
                rec.namespace = ns.clone();
                for &i in &need {
                    let (key, _, m, _, _) = &prepared[i];
                    rec.objects.entry(key.clone()).or_insert_with(|| ObjRecord {
                        api_version: m.api_version.clone(),
                        ..ObjRecord::default()
                    });
                }
            }
            self.save();
            if need.iter().any(|&i| prepared[i].0.namespace.is_some()) {
                match self.ensure_namespace(app, &ns).await {
                    Ok(()) => {}
                    Err(Fail::Down(why)) => {
                        self.unreachable_now(why);
                        return Outcome::Down;
                    }
                    Err(Fail::No(why)) => {
                        return failed(why, self.store.inv.apps.get(app));
                    }
                }
            }
            let pp = PatchParams {
                field_validation: Some(ValidationDirective::Strict),
                ..PatchParams::apply(FIELD_MANAGER).force()
            };
            for &i in &need {
                let (key, kind, m, body, h) = &prepared[i];
                let api = self.api(kind, key.namespace.as_deref());
                match call(
                    self.timing.call,
                    api.patch(&m.name, &pp, &Patch::Apply(body)),
                )
                .await
                {
                    Ok(obj) => {
                        self.reached();
                        let v = serde_json::to_value(&obj).unwrap_or(Value::Null);
                        if let Some(o) = self
                            .store
                            .inv
                            .apps
                            .get_mut(app)
                            .and_then(|r| r.objects.get_mut(key))
                        {
                            *o = ObjRecord {
                                api_version: m.api_version.clone(),
                                uid: obj.metadata.uid.clone(),
                                applied: Some(h.clone()),
                                fields: objects::owned_fields(&v, FIELD_MANAGER),
                                resource_version: obj.metadata.resource_version.clone(),
                            };
                        }
                        self.drifted.remove(key);
                        if rollout::has_rollout(&key.kind) {
                            self.live.insert(key.clone(), v);
                        }
                    }
                    Err(e) if unreachable(&e) => {
                        self.save();
                        self.unreachable_now(explain(&e));
                        return Outcome::Down;
                    }
                    Err(e) => {
                        self.reached();
                        if code(&e) == Some(404) {
                            // The kind went away (a CRD removed), or the
                            // namespace did: look both up again.
                            self.disco.remove(&(m.api_version.clone(), m.kind.clone()));
                            self.known_ns.remove(&ns);
                        }
                        errors.push(format!("{} {}: {}", m.kind, m.name, explain(&e)));
                    }
                }
            }
            self.save();
        }
        if !errors.is_empty() {
            // Nothing is pruned after a failed apply: what replaces an old
            // object may be the one that failed.
            return failed(errors.join("; "), self.store.inv.apps.get(app));
        }
        // Prune what left the manifests.
        let keep: BTreeSet<&ObjKey> = prepared.iter().map(|p| &p.0).collect();
        let (kept, stale): (Records, Records) = self
            .store
            .inv
            .apps
            .get(app)
            .map(|r| {
                r.objects
                    .iter()
                    .map(|(k, o)| (k.clone(), o.clone()))
                    .partition(|(k, _)| keep.contains(k))
            })
            .unwrap_or_default();
        let keep_uids: BTreeSet<String> = kept.into_iter().filter_map(|(_, o)| o.uid).collect();
        let mut pending = Vec::new();
        for (key, rec) in stale {
            let same_object = rec.uid.as_ref().is_some_and(|u| keep_uids.contains(u));
            let done = if same_object {
                // The same object under another group (an alias): keep it.
                Ok(())
            } else {
                tracing::info!(%app, object = %key, "pruning: left the desired state");
                self.delete(&key, &rec).await
            };
            match done {
                Ok(()) => {
                    if let Some(r) = self.store.inv.apps.get_mut(app) {
                        r.objects.remove(&key);
                    }
                    self.live.remove(&key);
                }
                Err(Fail::Down(why)) => {
                    self.save();
                    self.unreachable_now(why);
                    return Outcome::Down;
                }
                Err(Fail::No(why)) => pending.push(format!("{key} ({why})")),
            }
        }
        self.save();
        // Rollout status.
        let mut waiting = Vec::new();
        let mut broken = Vec::new();
        for (key, kind, m, _, _) in &prepared {
            if !rollout::has_rollout(&key.kind) {
                continue;
            }
            if !self.live.contains_key(key) {
                match call(
                    self.timing.call,
                    self.api(kind, key.namespace.as_deref()).get(&m.name),
                )
                .await
                {
                    Ok(obj) => {
                        self.reached();
                        self.live.insert(
                            key.clone(),
                            serde_json::to_value(&obj).unwrap_or(Value::Null),
                        );
                    }
                    Err(e) if unreachable(&e) => {
                        self.unreachable_now(explain(&e));
                        return Outcome::Down;
                    }
                    Err(e) => {
                        broken.push(format!("{key}: {}", explain(&e)));
                        continue;
                    }
                }
            }
            match self.live.get(key).map(|o| rollout::status(&key.kind, o)) {
                Some(Rollout::Waiting(why)) => waiting.push(why),
                Some(Rollout::Failed(why)) => broken.push(why),
                Some(Rollout::Done) | None => {}
            }
        }
        if self.down.is_some() {
            return Outcome::Down;
        }
        let Some(rec) = self.store.inv.apps.get_mut(app) else {
            return Outcome::Report(report(WorkloadState::Pending, None, None));
        };
        let mut notes = Vec::new();
        let state = if !broken.is_empty() {
            notes.extend(broken);
            WorkloadState::Failed
        } else if !waiting.is_empty() {
            if rec.running_version != version
                && let Some(v) = &version
            {
                notes.push(format!("rolling out {v}"));
            }
            notes.extend(waiting);
            WorkloadState::Pending
        } else {
            rec.running_version = version.clone();
            WorkloadState::Running
        };
        if !pending.is_empty() {
            notes.push(format!("pending removal: {}", pending.join(", ")));
        }
        let running = rec.running_version.clone();
        self.save();
        Outcome::Report(report(
            state,
            (!notes.is_empty()).then(|| notes.join("; ")),
            running,
        ))
    }

    /// Makes sure the app's namespace exists: creates it (marked as Shoal's)
    /// only when it does not; never applies one it found.
    async fn ensure_namespace(&mut self, app: &str, ns: &str) -> Result<(), Fail> {
        if self.known_ns.contains(ns) {
            return Ok(());
        }
        let kind = Kind {
            ar: ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Namespace")),
            namespaced: false,
        };
        let api = self.api(&kind, None);
        match call(self.timing.call, api.get_opt(ns)).await {
            Ok(Some(_)) => {
                self.known_ns.insert(ns.to_string());
                return Ok(());
            }
            Ok(None) => {}
            Err(e) if code(&e) == Some(403) => {
                // Credentials limited to granted namespaces cannot read
                // namespaces: assume it was granted; applies say otherwise.
                self.known_ns.insert(ns.to_string());
                return Ok(());
            }
            Err(e) => return Err(Fail::of(&e).context(&format!("namespace {ns}"))),
        }
        // Recorded before it is made: a crash in between leaves a record
        // that the missing annotation makes harmless.
        self.store.inv.namespaces.insert(ns.to_string());
        self.save();
        let mut labels = serde_json::Map::new();
        labels.insert(MANAGED_BY.0.into(), json!(MANAGED_BY.1));
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": ns,
                "labels": labels,
                "annotations": { CREATED_BY.0: CREATED_BY.1 },
            },
        }))
        .map_err(|e| Fail::No(format!("namespace {ns}: {e}")))?;
        match call(self.timing.call, api.create(&PostParams::default(), &obj)).await {
            Ok(_) => {
                tracing::info!(%app, %ns, "created the app's namespace");
                self.known_ns.insert(ns.to_string());
                Ok(())
            }
            Err(e) if code(&e) == Some(409) => {
                // Someone made it meanwhile: it is not Shoal's.
                self.store.inv.namespaces.remove(ns);
                self.known_ns.insert(ns.to_string());
                Ok(())
            }
            Err(e) if unreachable(&e) => Err(Fail::of(&e)),
            Err(e) => {
                self.store.inv.namespaces.remove(ns);
                Err(Fail::No(format!(
                    "namespace {ns} does not exist and could not be created: {}",
                    explain(&e)
                )))
            }
        }
    }

    /// Deletes one object Shoal made; gone already, or replaced by someone
    /// else's object of the same name (another UID), counts as done.
    async fn delete(&mut self, key: &ObjKey, rec: &ObjRecord) -> Result<(), Fail> {
        let kind = match self.resolve(&rec.api_version, &key.kind).await {
            Ok(k) => k,
            // The kind is no longer served: nothing of it is left.
            Err(Fail::No(_)) => return Ok(()),
            Err(down) => return Err(down),
        };
        let api = self.api(&kind, key.namespace.as_deref());
        let dp = DeleteParams {
            preconditions: rec.uid.clone().map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match call(self.timing.call, api.delete(&key.name, &dp)).await {
            Ok(_) => {
                self.reached();
                Ok(())
            }
            Err(e) if matches!(code(&e), Some(404) | Some(409)) => {
                self.reached();
                Ok(())
            }
            Err(e) => Err(Fail::of(&e)),
        }
    }

    /// Deletes what Shoal made for an app that left; `None` once all gone.
    async fn remove_app(&mut self, app: &str) -> Option<WorkloadReport> {
        let rec = self.store.inv.apps.get(app)?.clone();
        let mut pending = Vec::new();
        for (key, o) in &rec.objects {
            match self.delete(key, o).await {
                Ok(()) => {
                    tracing::info!(%app, object = %key, "deleted: the app left this node");
                    if let Some(r) = self.store.inv.apps.get_mut(app) {
                        r.objects.remove(key);
                    }
                    self.live.remove(key);
                    self.drifted.remove(key);
                }
                Err(Fail::Down(why)) => {
                    self.unreachable_now(why.clone());
                    pending.push(format!("{key} ({why})"));
                }
                Err(Fail::No(why)) => pending.push(format!("{key} ({why})")),
            }
        }
        self.save();
        if pending.is_empty() {
            self.store.inv.apps.remove(app);
            self.save();
            return None;
        }
        Some(report(
            WorkloadState::Stopped,
            Some(format!("removing; pending removal: {}", pending.join(", "))),
            rec.running_version,
        ))
    }

    /// Deletes the namespaces Shoal created that no app uses any more, if
    /// they still carry Shoal's mark. Returns whether none is left to delete.
    async fn collect_namespaces(&mut self) -> bool {
        let unused: Vec<String> = self
            .store
            .inv
            .namespaces
            .iter()
            .filter(|ns| !self.store.namespace_in_use(ns))
            .cloned()
            .collect();
        if unused.is_empty() {
            return true;
        }
        let mut all = true;
        let kind = Kind {
            ar: ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Namespace")),
            namespaced: false,
        };
        let api = self.api(&kind, None);
        for ns in unused {
            let done = match call(self.timing.call, api.get_opt(&ns)).await {
                Ok(None) => true,
                Ok(Some(obj)) => {
                    let ours = obj
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(CREATED_BY.0))
                        .is_some_and(|v| v == CREATED_BY.1);
                    if !ours {
                        true
                    } else {
                        let dp = DeleteParams {
                            preconditions: obj.metadata.uid.clone().map(|uid| Preconditions {
                                uid: Some(uid),
                                resource_version: None,
                            }),
                            ..DeleteParams::default()
                        };
                        match call(self.timing.call, api.delete(&ns, &dp)).await {
                            Ok(_) => {
                                tracing::info!(%ns, "deleted the namespace Shoal created");
                                true
                            }
                            Err(e) if matches!(code(&e), Some(404) | Some(409)) => true,
                            Err(e) => {
                                tracing::warn!(%ns, error = %explain(&e), "namespace not deleted yet");
                                false
                            }
                        }
                    }
                }
                Err(e) => {
                    if unreachable(&e) {
                        tracing::debug!(%ns, error = %explain(&e), "namespace not deleted yet");
                    } else {
                        tracing::warn!(%ns, error = %explain(&e), "namespace not deleted yet");
                    }
                    false
                }
            };
            if done {
                self.store.inv.namespaces.remove(&ns);
                self.known_ns.remove(&ns);
            } else {
                all = false;
            }
        }
        all
    }

    /// Starts the watches now needed and stops the others.
    fn keep_watches(&mut self, want: BTreeMap<WatchKey, Kind>) {
        self.watches.retain(|k, task| {
            let keep = want.contains_key(k) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (wk, kind) in want {
            if self.watches.contains_key(&wk) {
                continue;
            }
            let api = self.api(&kind, wk.namespace.as_deref());
            let task = tokio::spawn(watch_task(
                api,
                wk.clone(),
                self.seen_tx.clone(),
                self.timing.call,
            ));
            self.watches.insert(wk, task);
        }
    }
}

/// Lists then watches Shoal's objects of one kind in one namespace, and
/// tells the reconciler what it sees; lists again after any break.
async fn watch_task(
    api: Api<DynamicObject>,
    wk: WatchKey,
    tx: mpsc::Sender<Seen>,
    limit: Duration,
) {
    let selector = objects::selector(None);
    let mut backoff = Duration::from_secs(1);
    let to_value = |o: &DynamicObject| serde_json::to_value(o).unwrap_or(Value::Null);
    loop {
        let list = match call(limit, api.list(&ListParams::default().labels(&selector))).await {
            Ok(l) => l,
            Err(e) => {
                let msg = if unreachable(&e) {
                    Seen::Down(explain(&e))
                } else {
                    tracing::warn!(kind = %wk.kind, ns = ?wk.namespace, error = %explain(&e),
                        "cannot list Shoal's objects: drift is repaired only by the periodic re-apply");
                    Seen::Up
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_secs(1);
        let mut rv = list.metadata.resource_version.clone().unwrap_or_default();
        let items = list.items.iter().map(to_value).collect();
        if tx.send(Seen::Up).await.is_err()
            || tx.send(Seen::Listed(wk.clone(), items)).await.is_err()
        {
            return;
        }
        let started = tokio::time::Instant::now();
        let wp = WatchParams::default().labels(&selector).timeout(290);
        match call(limit, api.watch(&wp, &rv)).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                // The server ends a watch after `timeout`; a connection that
                // went silent longer than that is dead.
                while let Ok(Some(ev)) = tokio::time::timeout(WATCH_SILENCE, stream.next()).await {
                    let msg = match ev {
                        Ok(WatchEvent::Added(o)) | Ok(WatchEvent::Modified(o)) => {
                            rv = o.metadata.resource_version.clone().unwrap_or(rv);
                            Seen::Put(wk.clone(), to_value(&o))
                        }
                        Ok(WatchEvent::Deleted(o)) => Seen::Gone(wk.clone(), to_value(&o)),
                        Ok(WatchEvent::Bookmark(b)) => {
                            rv = b.metadata.resource_version;
                            continue;
                        }
                        // 410 Gone and the like: list again.
                        Ok(WatchEvent::Error(_)) | Err(_) => break,
                    };
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(kind = %wk.kind, error = %explain(&e), "watch refused");
            }
        }
        if started.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// A time as `2026-11-27T18:12:01Z` (UTC), with no calendar crate.
pub fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian
    // calendar, counted in 400-year eras).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        let at = |s: u64| utc(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_803_121), "2026-11-27T18:12:01Z");
    }
}
