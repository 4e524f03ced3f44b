//! The reconciler task: one per node, owning the inventory, the discovery
//! cache, the watches' latest copies and every request to the API server.
//! Each round applies what changed or drifted, prunes, reads rollout
//! status, removes apps that left and deletes namespaces nobody uses; a
//! round comes on a change of the desired state, on watch events, and on a
//! timer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::Instrument;

use crdt_state::fleet::model::{RuntimeKind, WorkloadReport, WorkloadState};
use crdt_state::fleet::placement::Workload;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions,
    ValidationDirective,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::inventory::{AppRecord, CREATED_BY, ObjKey, ObjRecord, Stored};
use super::objects::{self, APP_LABEL, MANAGED_BY, Manifest};
use super::rollout::{self, Rollout};
use super::watcher::{self, Seen, WatchKey};
use super::{
    FIELD_MANAGER, Fail, Kind, Status, Timing, call, code, explain, transient, unreachable, utc,
};

/// The first retry after a round that left something failed or pending.
const RETRY: Duration = Duration::from_secs(1);
/// Watch events arriving within this window are handled in one round.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Drift repaired this many times in a row is a fight with another writer.
const FIGHT: u32 = 3;
/// A kind no version of its group serves for this long is taken as gone.
const ABSENT: Duration = Duration::from_secs(60);
/// After which repairs are spaced out, doubling up to this.
const FIGHT_MAX: Duration = Duration::from_secs(300);
/// A repair this long after the last one starts the count over.
const FIGHT_FORGOTTEN: Duration = Duration::from_secs(600);

/// Objects with what is recorded of them.
type Records = Vec<(ObjKey, ObjRecord)>;
/// An app's manifests parsed, or why they could not be.
type Parsed = Arc<Result<Vec<Manifest>, String>>;

/// An app whose last attempt failed: not tried again before `next` unless
/// its spec changed.
struct Backoff {
    spec: String,
    report: WorkloadReport,
    next: Instant,
    wait: Duration,
}

/// Another writer keeps changing an object: repairs are spaced out.
struct Fight {
    repairs: u32,
    last: Instant,
    next: Instant,
    by: Option<String>,
}

/// Who holds an object of this name now.
enum Claim {
    /// Nobody: it does not exist.
    Free,
    /// This app (it carries the app's labels), with its UID.
    Ours(Option<String>),
    /// Someone else; the words say whose.
    Foreign(String),
}

pub(super) struct Reconciler {
    client: kube::Client,
    timing: Timing,
    store: Stored,
    disco: HashMap<(String, String), Kind>,
    /// The latest copy of every workload object (Deployment, StatefulSet,
    /// DaemonSet) Shoal owns, from watches, apply answers and reads.
    live: BTreeMap<ObjKey, Value>,
    /// Objects someone else changed or deleted: re-applied next round.
    drifted: BTreeSet<ObjKey>,
    fights: BTreeMap<ObjKey, Fight>,
    backoff: BTreeMap<String, Backoff>,
    /// Per app: its namespace and manifests as last parsed, and the result.
    /// Rounds come with every batch of watch events; the YAML is parsed
    /// only when it changed.
    parsed: HashMap<String, (String, String, Parsed)>,
    /// Deletions refused: when to ask again, and why it was refused.
    delete_retry: BTreeMap<ObjKey, (Instant, String)>,
    delete_wait: BTreeMap<ObjKey, Duration>,
    /// Since when an object's kind has not been served at all.
    absent: BTreeMap<ObjKey, (Instant, Instant)>,
    /// A watch could not list: the next round probes the server first.
    probe: bool,
    watches: BTreeMap<WatchKey, JoinHandle<()>>,
    seen_tx: mpsc::Sender<Seen>,
    /// Namespaces known to exist (or not visible with these credentials).
    known_ns: BTreeSet<String>,
    wanted: BTreeSet<String>,
    /// The last report of each app made while the API server answered.
    last: BTreeMap<String, WorkloadReport>,
    /// Since when, and why, the API server cannot be reached (or fails).
    down: Option<(SystemTime, String)>,
    /// A request of this round found it so: the rest of the round sends none.
    round_down: bool,
    status: Status,
}

impl Drop for Reconciler {
    fn drop(&mut self) {
        for (_, w) in std::mem::take(&mut self.watches) {
            w.abort();
        }
    }
}

fn report(state: WorkloadState, reason: Option<String>, version: Option<String>) -> WorkloadReport {
    WorkloadReport {
        state,
        reason,
        restarts: 0,
        version,
        revision: None,
    }
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

/// `a` is older than `b`, when both are resourceVersions the API server
/// wrote as integers (etcd's are; anything else counts as not older).
fn older(a: Option<&str>, b: Option<&str>) -> bool {
    match (
        a.and_then(|v| v.parse::<u64>().ok()),
        b.and_then(|v| v.parse::<u64>().ok()),
    ) {
        (Some(a), Some(b)) => a < b,
        _ => false,
    }
}

fn namespace_kind() -> Kind {
    Kind {
        ar: ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Namespace")),
        namespaced: false,
    }
}

/// Whether `obj` carries the labels Shoal puts on `app`'s objects.
fn labelled_for(obj: &Value, app: &str) -> bool {
    let l = |k: &str| {
        obj.pointer("/metadata/labels")
            .and_then(|l| l.get(k)?.as_str())
    };
    l(MANAGED_BY.0) == Some(MANAGED_BY.1) && l(APP_LABEL) == Some(app)
}

/// The manager that last updated `obj` other than Shoal, if any.
fn other_writer(obj: &Value) -> Option<String> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)?
        .iter()
        .filter(|e| e.get("manager").and_then(Value::as_str) != Some(FIELD_MANAGER))
        .filter(|e| e.get("subresource").is_none_or(|s| s.as_str() == Some("")))
        .max_by_key(|e| e.get("time").and_then(Value::as_str).unwrap_or(""))
        .and_then(|e| e.get("manager")?.as_str().map(String::from))
}

impl Reconciler {
    pub(super) fn new(
        client: kube::Client,
        timing: Timing,
        store: Stored,
        seen_tx: mpsc::Sender<Seen>,
        status: Status,
    ) -> Reconciler {
        Reconciler {
            client,
            timing,
            store,
            disco: HashMap::new(),
            live: BTreeMap::new(),
            drifted: BTreeSet::new(),
            fights: BTreeMap::new(),
            backoff: BTreeMap::new(),
            parsed: HashMap::new(),
            delete_retry: BTreeMap::new(),
            delete_wait: BTreeMap::new(),
            absent: BTreeMap::new(),
            probe: false,
            watches: BTreeMap::new(),
            seen_tx,
            known_ns: BTreeSet::new(),
            wanted: BTreeSet::new(),
            last: BTreeMap::new(),
            down: None,
            round_down: false,
            status,
        }
    }

    pub(super) async fn run(
        mut self,
        mut rx: watch::Receiver<Vec<Workload>>,
        mut seen: mpsc::Receiver<Seen>,
    ) {
        // No round before the daemon says what is desired: a round on the
        // channel's empty start would remove every app the inventory holds.
        if rx.changed().await.is_err() {
            return;
        }
        let mut last_full = Instant::now();
        let mut retry = RETRY;
        loop {
            let desired = rx.borrow_and_update().clone();
            let full = last_full.elapsed() >= self.timing.reapply;
            let unsettled = self.round(&desired, full).await;
            // A backstop that could not reach the server is not spent.
            if full && !self.round_down {
                last_full = Instant::now();
            }
            // What failed (a CRD not installed yet, a refusal, the API
            // server away) is tried again soon, then every `resync`.
            let mut wait = if unsettled {
                let w = retry;
                retry = (retry * 2).min(self.timing.resync);
                w
            } else {
                retry = RETRY;
                self.timing.resync
            };
            // A repair spaced out comes when it is due.
            let now = Instant::now();
            if let Some(due) = self
                .fights
                .iter()
                .filter(|(k, f)| self.drifted.contains(*k) && f.next > now)
                .map(|(_, f)| f.next)
                .min()
            {
                wait = wait.min(due.saturating_duration_since(now));
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                Some(s) = seen.recv() => {
                    self.on_seen(s);
                    // Take what else arrives at once in the same round.
                    let until = Instant::now() + DEBOUNCE;
                    while let Ok(Some(s)) = tokio::time::timeout_at(until, seen.recv()).await {
                        self.on_seen(s);
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Writes the inventory; `false` (logged) when it cannot be written.
    fn save(&mut self) -> bool {
        match self.store.save() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "the kube inventory could not be written");
                false
            }
        }
    }

    fn unreachable_now(&mut self, why: String) {
        self.round_down = true;
        if self.down.is_none() {
            tracing::warn!(error = %why, "Kubernetes API server unreachable");
            self.down = Some((SystemTime::now(), why));
        }
    }

    /// `app`'s manifests parsed, from the cache while they are unchanged.
    fn parse(&mut self, app: &str, ns: &str, manifests: &str) -> Parsed {
        if let Some((n, m, p)) = self.parsed.get(app)
            && n == ns
            && m == manifests
        {
            return p.clone();
        }
        let p: Parsed = Arc::new(objects::parse(ns, manifests));
        self.parsed.insert(
            app.to_string(),
            (ns.to_string(), manifests.to_string(), p.clone()),
        );
        p
    }

    /// What is recorded of `key` for `app`.
    fn record(&self, app: &str, key: &ObjKey) -> Option<&ObjRecord> {
        self.store.inv.apps.get(app)?.objects.get(key)
    }

    fn record_mut(&mut self, app: &str, key: &ObjKey) -> Option<&mut ObjRecord> {
        self.store.inv.apps.get_mut(app)?.objects.get_mut(key)
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

    fn owned_mut(&mut self, key: &ObjKey) -> Option<&mut ObjRecord> {
        let wanted = &self.wanted;
        self.store
            .inv
            .apps
            .iter_mut()
            .filter(|(a, _)| wanted.contains(*a))
            .find_map(|(_, r)| r.objects.get_mut(key))
    }

    /// Marks an object for repair, spacing repairs out when another writer
    /// keeps changing it.
    fn drift(&mut self, key: ObjKey, by: Option<String>) {
        let now = Instant::now();
        let f = self.fights.entry(key.clone()).or_insert(Fight {
            repairs: 0,
            last: now,
            next: now,
            by: None,
        });
        if self.drifted.contains(&key) {
            // Already due for repair: more events of the same change.
            if f.by.is_none() {
                f.by = by;
            }
            return;
        }
        if now.duration_since(f.last) > FIGHT_FORGOTTEN {
            f.repairs = 0;
            f.by = None;
        }
        f.repairs += 1;
        f.last = now;
        // The first writer named in a fight stays named: stable words.
        f.by = f.by.take().or(by);
        f.next = if f.repairs > FIGHT {
            let wait = Duration::from_secs(1 << (f.repairs - FIGHT).min(9)).min(FIGHT_MAX);
            now + wait
        } else {
            now
        };
        self.drifted.insert(key);
    }

    fn on_seen(&mut self, s: Seen) {
        match s {
            Seen::Down(why) => {
                // The round's probe decides; one kind's list timing out is
                // not the whole server being away.
                tracing::debug!(error = %why, "a watch could not list");
                self.probe = true;
            }
            Seen::Put(wk, obj) => self.observe(&wk, obj),
            Seen::Gone(wk, obj) => {
                let Some(key) = key_of(&wk, &obj) else { return };
                let Some(rec) = self.owned(&key) else { return };
                if older(
                    meta(&obj, "resourceVersion"),
                    rec.resource_version.as_deref(),
                ) || (rec.uid.is_some() && rec.uid.as_deref() != meta(&obj, "uid"))
                {
                    return;
                }
                tracing::info!(object = %key, "deleted by someone else: re-applying");
                // That object is gone (or lost Shoal's labels): whatever holds
                // the name next is looked at before Shoal writes it.
                if let Some(r) = self.owned_mut(&key) {
                    r.unverified = true;
                }
                self.live.remove(&key);
                self.drift(key, None);
            }
            Seen::Listed(wk, items, rv) => {
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
                            // Written after this list was taken: not missing.
                            && !older(Some(&rv), r.resource_version.as_deref())
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in missing {
                    tracing::info!(object = %k, "missing from the cluster: re-applying");
                    if let Some(r) = self.owned_mut(&k) {
                        r.unverified = true;
                    }
                    self.live.remove(&k);
                    self.drift(k, None);
                }
            }
        }
    }

    fn observe(&mut self, wk: &WatchKey, obj: Value) {
        let Some(key) = key_of(wk, &obj) else { return };
        let Some(rec) = self.owned(&key) else { return };
        let rv = meta(&obj, "resourceVersion");
        // An event from before Shoal's last write says nothing new.
        if older(rv, rec.resource_version.as_deref()) {
            return;
        }
        let same = rec.uid.is_none() || rec.uid.as_deref() == meta(&obj, "uid");
        let written = rv.is_some() && rv == rec.resource_version.as_deref();
        let changed = same
            && !written
            && rec.fields.is_some()
            && objects::owned_fields(&obj, FIELD_MANAGER) != rec.fields;
        if !same {
            // Another object under the name (it carries Shoal's labels, or
            // the watch would not show it): looked at before any write.
            tracing::info!(object = %key, "re-created by someone else");
            if let Some(r) = self.owned_mut(&key) {
                r.unverified = true;
            }
            self.drift(key.clone(), other_writer(&obj));
        } else if changed {
            tracing::info!(object = %key, "changed by someone else: re-applying");
            self.drift(key.clone(), other_writer(&obj));
        }
        if rollout::has_rollout(&key.group, &key.kind) {
            let stored = self.live.get(&key).and_then(|o| meta(o, "resourceVersion"));
            if !older(rv, stored) {
                self.live.insert(key, obj);
            }
        }
    }

    async fn resolve(&mut self, api_version: &str, kind: &str) -> Result<Kind, Fail> {
        let k = (api_version.to_string(), kind.to_string());
        if let Some(found) = self.disco.get(&k) {
            return Ok(found.clone());
        }
        if self.round_down {
            return Err(Fail::Down(String::new()));
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
                let found = Kind {
                    ar,
                    namespaced: caps.scope == Scope::Namespaced,
                };
                self.disco.insert(k, found.clone());
                Ok(found)
            }
            Err(kube::Error::Discovery(_)) => Err(no_match()),
            Err(e) if code(&e) == Some(404) => Err(no_match()),
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// The kind under any version its group still serves (for objects
    /// recorded under a version the cluster dropped); `Ok(None)` when the
    /// group serves it under none.
    async fn resolve_any(&mut self, api_version: &str, kind: &str) -> Result<Option<Kind>, Fail> {
        match self.resolve(api_version, kind).await {
            Ok(k) => return Ok(Some(k)),
            Err(Fail::No(_)) => {}
            Err(down) => return Err(down),
        }
        let group = objects::group_of(api_version);
        match call(
            self.timing.call,
            kube::discovery::group(&self.client, group),
        )
        .await
        {
            Ok(g) => Ok(g
                .resources_by_stability()
                .into_iter()
                .find(|(ar, _)| ar.kind == kind)
                .map(|(ar, caps)| Kind {
                    ar,
                    namespaced: caps.scope == Scope::Namespaced,
                })),
            Err(kube::Error::Discovery(_)) => Ok(None),
            Err(e) if code(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// A failed request as a [`Fail`]; a transient one marks the API
    /// server down for the rest of the round.
    fn failed(&mut self, e: &kube::Error) -> Fail {
        // Overloaded or unavailable: this request's failure; the next
        // round's readiness probe says whether the whole server is away.
        if matches!(code(e), Some(429) | Some(503)) {
            self.probe = true;
        }
        let f = Fail::of(e);
        if let Fail::Down(why) = &f {
            self.unreachable_now(why.clone());
        }
        f
    }

    fn api(&self, kind: &Kind, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &kind.ar),
            None => Api::all_with(self.client.clone(), &kind.ar),
        }
    }

    /// Who holds `key` now: free, this app's (by its labels), or someone
    /// else's.
    async fn claim(
        &mut self,
        app: &str,
        key: &ObjKey,
        kind: &Kind,
        recorded: Option<&str>,
    ) -> Result<Claim, Fail> {
        if self.round_down {
            return Err(Fail::Down(String::new()));
        }
        let api = self.api(kind, key.namespace.as_deref());
        match call(self.timing.call, api.get_opt(&key.name)).await {
            Ok(None) => Ok(Claim::Free),
            Ok(Some(obj)) => {
                let v = serde_json::to_value(&obj).unwrap_or(Value::Null);
                // The object Shoal made (its UID), whatever became of its
                // labels, or one that carries this app's labels.
                if labelled_for(&v, app)
                    || (recorded.is_some() && obj.metadata.uid.as_deref() == recorded)
                {
                    Ok(Claim::Ours(obj.metadata.uid.clone()))
                } else {
                    let whose = match v
                        .pointer("/metadata/labels")
                        .and_then(|l| l.get(APP_LABEL)?.as_str())
                    {
                        Some(other) => format!("Shoal's app {other}'s"),
                        None => "not Shoal's".into(),
                    };
                    Ok(Claim::Foreign(whose))
                }
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// One pass over every app; returns whether anything is left failed,
    /// unknown, waiting or pending removal.
    async fn round(&mut self, desired: &[Workload], full: bool) -> bool {
        self.round_down = false;
        // While the server was away (or a watch could not list), one cheap
        // probe of its readiness decides whether this round talks to it.
        if self.down.is_some() || std::mem::take(&mut self.probe) {
            let req = axum::http::Request::get("/readyz").body(Vec::new());
            match req {
                Ok(req) => match call(self.timing.call, self.client.request_text(req)).await {
                    Err(e) if unreachable(&e) => self.unreachable_now(explain(&e)),
                    Err(kube::Error::Api(st)) if st.code >= 500 => self.unreachable_now(format!(
                        "Kubernetes API server not ready: {}",
                        st.message
                    )),
                    _ => {}
                },
                Err(e) => tracing::debug!(error = %e, "readiness probe"),
            }
        }
        let mut out = BTreeMap::new();
        let mut wanted = BTreeSet::new();
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
        let mut unsettled = false;
        let mut watch_keys = BTreeMap::new();
        for w in desired.iter().filter(|w| wanted.contains(&w.app)) {
            // Only an app that failed a moment ago needs its spec compared.
            let spec = || serde_json::to_string(w).unwrap_or_default();
            if let Some(b) = self.backoff.get(&w.app)
                && b.spec == spec()
                && Instant::now() < b.next
                && !full
                && !self.round_down
            {
                // Failed a moment ago and nothing changed: not yet again.
                out.insert(w.app.clone(), b.report.clone());
                unsettled = true;
                continue;
            }
            let r = match self.app_round(w, full, &mut watch_keys).await {
                Some(r) => r,
                None => self.unknown(&w.app),
            };
            if r.state == WorkloadState::Failed {
                let spec = spec();
                let b = self.backoff.entry(w.app.clone()).or_insert(Backoff {
                    spec: spec.clone(),
                    report: r.clone(),
                    next: Instant::now(),
                    wait: RETRY / 2,
                });
                b.wait = if b.spec == spec {
                    (b.wait * 2).min(self.timing.resync)
                } else {
                    RETRY
                };
                b.spec = spec;
                b.report = r.clone();
                b.next = Instant::now() + b.wait;
            } else {
                self.backoff.remove(&w.app);
            }
            // A failure that may be the server's own (a 503 or 429, which
            // the next round's probe judges) is not what "last known" means.
            if r.state != WorkloadState::Unknown && !self.probe {
                self.last.insert(w.app.clone(), r.clone());
            }
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
            }
        }
        unsettled |= !self.collect_namespaces().await;
        self.save();
        // Keep watching what is recorded for apps still wanted, whatever
        // their last round did.
        for (app, rec) in &self.store.inv.apps {
            if !wanted.contains(app) {
                continue;
            }
            for (key, o) in &rec.objects {
                if let Some(kind) = self.disco.get(&(o.api_version.clone(), key.kind.clone())) {
                    watch_keys.insert(
                        WatchKey {
                            api_version: o.api_version.clone(),
                            kind: key.kind.clone(),
                            namespace: key.namespace.clone(),
                        },
                        kind.clone(),
                    );
                }
            }
        }
        self.keep_watches(watch_keys);
        let inv = &self.store.inv;
        self.last
            .retain(|a, _| wanted.contains(a) || inv.apps.contains_key(a));
        self.backoff.retain(|a, _| wanted.contains(a));
        self.parsed.retain(|a, _| wanted.contains(a));
        let recorded = |k: &ObjKey| inv.apps.values().any(|r| r.objects.contains_key(k));
        self.fights.retain(|k, _| recorded(k));
        self.delete_retry.retain(|k, _| recorded(k));
        self.delete_wait.retain(|k, _| recorded(k));
        self.absent.retain(|k, _| recorded(k));
        if self.round_down {
            // Every kube app: the server is away, whatever this round read.
            for app in &wanted {
                if out
                    .get(app)
                    .is_some_and(|r| r.state != WorkloadState::Unknown)
                {
                    let r = self.unknown(app);
                    out.insert(app.clone(), r);
                }
            }
        } else if let Some((since, _)) = self.down.take() {
            tracing::info!(since = %utc(since), "Kubernetes API server reachable again");
        }
        unsettled |= out.values().any(|r| {
            matches!(
                r.state,
                WorkloadState::Failed | WorkloadState::Unknown | WorkloadState::Stopped
            ) || r.reason.as_deref().is_some_and(|why| {
                why.contains("pending removal") || why.contains("waiting for the cluster")
            })
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

    /// One app: resolve, check claims, record, apply what changed or
    /// drifted, prune, read rollout status. `None`: the API server is away.
    async fn app_round(
        &mut self,
        w: &Workload,
        full: bool,
        watch_keys: &mut BTreeMap<WatchKey, Kind>,
    ) -> Option<WorkloadReport> {
        if self.round_down {
            return None;
        }
        let spec = w.spec.kube.as_ref()?;
        let version = w.spec.version.clone();
        let app = w.app.as_str();
        let ns = spec
            .namespace
            .clone()
            .unwrap_or_else(|| format!("shoal-{app}"));
        let running = self
            .store
            .inv
            .apps
            .get(app)
            .and_then(|r| r.running_version.clone());
        let failed = |reason: String| report(WorkloadState::Failed, Some(reason), running.clone());
        let parsed = self.parse(app, &ns, &spec.manifests);
        let manifests = match &*parsed {
            Ok(m) => m,
            Err(e) => return Some(failed(e.clone())),
        };
        // The app's token, for its pods to read: a Secret of Shoal's own.
        let token = w
            .site_api
            .as_ref()
            .map(|a| objects::token_secret(app, &a.token));
        if let Some(t) = &token
            && let Some(m) = manifests
                .iter()
                .find(|m| m.kind == t.kind && m.group().is_empty() && m.name == t.name)
        {
            return Some(failed(format!(
                "manifest {}: {} {} is the name of the Secret Shoal gives the app's token; \
                 rename it",
                m.index, m.kind, m.name
            )));
        }
        let manifests: Vec<&Manifest> = token.iter().chain(manifests.iter()).collect();
        // Resolve every kind. A kind not served yet is waited for when its
        // CRD is in this very app (applied first); otherwise the app fails.
        let shipped: BTreeSet<(String, String)> = manifests
            .iter()
            .filter(|m| m.kind == "CustomResourceDefinition" && m.group() == "apiextensions.k8s.io")
            .filter_map(|m| {
                Some((
                    m.body.pointer("/spec/group")?.as_str()?.to_string(),
                    m.body.pointer("/spec/names/kind")?.as_str()?.to_string(),
                ))
            })
            .collect();
        let mut want: Vec<(ObjKey, Kind, &Manifest)> = Vec::new();
        let mut waiting = Vec::new();
        for m in manifests {
            let kind = match self.resolve(&m.api_version, &m.kind).await {
                Ok(k) => k,
                Err(Fail::Down(_)) => return None,
                Err(Fail::No(_)) if shipped.contains(&(m.group().to_string(), m.kind.clone())) => {
                    waiting.push(m.kind.clone());
                    continue;
                }
                Err(Fail::No(why)) => {
                    return Some(failed(format!(
                        "{}: {} {}: {why}",
                        m.place(),
                        m.kind,
                        m.name
                    )));
                }
            };
            if !kind.namespaced && !spec.allow_cluster_scoped {
                return Some(failed(format!(
                    "{}: {} {} is cluster-scoped; an app's objects live in its \
                     namespace {ns} (set spec.kube.allow_cluster_scoped: true to allow it)",
                    m.place(),
                    m.kind,
                    m.name
                )));
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
        // One object, one app.
        for (key, _, m) in &want {
            if let Some((other, _)) = self
                .store
                .inv
                .apps
                .iter()
                .find(|(a, r)| a.as_str() != app && r.objects.contains_key(key))
            {
                return Some(failed(format!(
                    "{}: {} {} already belongs to app {other}",
                    m.place(),
                    m.kind,
                    m.name
                )));
            }
        }
        // A new app: adopt what an earlier Shoal (or a lost data dir) left
        // labelled as this app's, so pruning still finds it.
        if !self.store.inv.apps.contains_key(app) {
            let found = self.adopt(app, &want).await?;
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
                let mut body = m.prepared(app, key.namespace.as_deref());
                objects::mount_artifacts(&mut body, &w.artifacts);
                if let Some(access) = &w.site_api {
                    objects::give_site_api(&mut body, app, access);
                }
                let h = objects::hash(&body);
                (key, kind, m, body, h)
            })
            .collect();
        let now = Instant::now();
        let mut spaced = Vec::new();
        let need: Vec<usize> = {
            let rec = self.store.inv.apps.get(app);
            prepared
                .iter()
                .enumerate()
                .filter(|(_, (key, _, _, _, h))| {
                    let recorded = rec.and_then(|r| r.objects.get(key));
                    let stale = recorded.and_then(|o| o.applied.as_ref()) != Some(h);
                    let drifted = self.drifted.contains(key);
                    if drifted
                        && !stale
                        && !full
                        && let Some(f) = self.fights.get(key)
                        && f.next > now
                    {
                        spaced.push(key.clone());
                        return false;
                    }
                    full || drifted || stale
                })
                .map(|(i, _)| i)
                .collect()
        };
        let mut errors = Vec::new();
        if !need.is_empty() {
            // A name Shoal holds no confirmed UID for may be someone else's:
            // look first (a read), and neither record nor write what is not
            // this app's.
            let mut send = Vec::new();
            for &i in &need {
                let (key, kind, m, _, _) = &prepared[i];
                let recorded = self.record(app, key).cloned();
                let confirmed = recorded
                    .as_ref()
                    .is_some_and(|o| o.uid.is_some() && !o.unverified);
                if !confirmed {
                    let uid = recorded.as_ref().and_then(|o| o.uid.clone());
                    match self.claim(app, key, kind, uid.as_deref()).await {
                        Ok(Claim::Free) | Ok(Claim::Ours(_)) => {}
                        Ok(Claim::Foreign(whose)) => {
                            if let Some(r) = self.store.inv.apps.get_mut(app) {
                                r.objects.remove(key);
                            }
                            self.drifted.remove(key);
                            errors.push(format!(
                                "{} {} exists and is {whose}: Shoal does not take over what it \
                                 did not create; delete or rename it",
                                m.kind, m.name
                            ));
                            continue;
                        }
                        Err(Fail::Down(_)) => {
                            self.save();
                            return None;
                        }
                        Err(Fail::No(why)) => {
                            errors.push(format!("{} {}: {why}", m.kind, m.name));
                            continue;
                        }
                    }
                }
                send.push(i);
            }
            // Record first: whatever happens next, Shoal knows it may have
            // made these. Nothing is sent if that record cannot be kept.
            if let Some(rec) = self.store.inv.apps.get_mut(app) {
                rec.namespace = ns.clone();
                for &i in &send {
                    let (key, _, m, _, _) = &prepared[i];
                    rec.objects.entry(key.clone()).or_insert_with(|| ObjRecord {
                        api_version: m.api_version.clone(),
                        ..ObjRecord::default()
                    });
                }
            }
            if !send.is_empty() && !self.save() {
                return Some(failed(
                    "the kube inventory cannot be written (see the node's log); nothing is \
                     applied until it can"
                        .into(),
                ));
            }
            if send.iter().any(|&i| prepared[i].0.namespace.is_some()) {
                match self.ensure_namespace(app, &ns).await {
                    Ok(()) => {}
                    Err(Fail::Down(_)) => return None,
                    Err(Fail::No(why)) => return Some(failed(why)),
                }
            }
            let pp = PatchParams {
                field_validation: Some(ValidationDirective::Strict),
                ..PatchParams::apply(FIELD_MANAGER).force()
            };
            for &i in &send {
                let (key, kind, m, body, h) = &prepared[i];
                // A confirmed UID goes with the apply as a precondition: an
                // object replaced by someone else meanwhile is refused, not
                // taken over.
                let recorded = self
                    .record(app, key)
                    .filter(|o| !o.unverified)
                    .and_then(|o| o.uid.clone());
                let mut body = body.clone();
                if let (Some(uid), Some(meta)) = (
                    recorded,
                    body.get_mut("metadata").and_then(Value::as_object_mut),
                ) {
                    meta.insert("uid".into(), json!(uid));
                }
                let api = self.api(kind, key.namespace.as_deref());
                match call(
                    self.timing.call,
                    api.patch(&m.name, &pp, &Patch::Apply(&body)),
                )
                .await
                {
                    Ok(obj) => {
                        let v = serde_json::to_value(&obj).unwrap_or(Value::Null);
                        if let Some(o) = self.record_mut(app, key) {
                            *o = ObjRecord {
                                api_version: m.api_version.clone(),
                                uid: obj.metadata.uid.clone(),
                                applied: Some(h.clone()),
                                fields: objects::owned_fields(&v, FIELD_MANAGER),
                                resource_version: obj.metadata.resource_version.clone(),
                                unverified: false,
                            };
                        }
                        self.drifted.remove(key);
                        if rollout::has_rollout(&key.group, &key.kind) {
                            self.live.insert(key.clone(), v);
                        }
                    }
                    Err(e) if transient(&e) => {
                        self.failed(&e);
                        self.save();
                        return None;
                    }
                    Err(kube::Error::Api(st))
                        if st.code == 409 && st.message.contains("Precondition failed: UID") =>
                    {
                        // Replaced by another object: looked at next round.
                        if let Some(o) = self.record_mut(app, key) {
                            o.unverified = true;
                        }
                        self.drifted.insert(key.clone());
                        errors.push(format!(
                            "{} {} was deleted or replaced by another object; looking at it \
                             before any write",
                            m.kind, m.name
                        ));
                    }
                    Err(kube::Error::Api(st))
                        if st.code == 403 && st.message.contains("being terminated") =>
                    {
                        self.known_ns.remove(&ns);
                        errors.push(format!(
                            "namespace {ns} is being deleted; waiting until it is gone"
                        ));
                        break;
                    }
                    Err(e) => {
                        self.failed(&e);
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
            return Some(failed(errors.join("; ")));
        }
        if !waiting.is_empty() {
            waiting.sort();
            waiting.dedup();
            return Some(report(
                WorkloadState::Pending,
                Some(format!(
                    "waiting for the cluster to serve {} (its CustomResourceDefinition is in \
                     this app)",
                    waiting.join(", ")
                )),
                running,
            ));
        }
        // Prune what left the manifests.
        let keep: BTreeSet<&ObjKey> = prepared.iter().map(|p| &p.0).collect();
        // Wanted again: a deletion's backoff from before does not carry over.
        for k in &keep {
            self.delete_retry.remove(*k);
            self.delete_wait.remove(*k);
        }
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
                self.delete(app, &key, &rec).await
            };
            match done {
                Ok(()) => {
                    if let Some(r) = self.store.inv.apps.get_mut(app) {
                        r.objects.remove(&key);
                    }
                    self.live.remove(&key);
                    self.drifted.remove(&key);
                }
                Err(Fail::Down(_)) => {
                    self.save();
                    return None;
                }
                Err(Fail::No(why)) => pending.push(format!("{key} ({why})")),
            }
        }
        self.save();
        // Rollout status.
        let mut moving = Vec::new();
        let mut broken = Vec::new();
        for (key, kind, m, _, _) in &prepared {
            if !rollout::has_rollout(&key.group, &key.kind) {
                continue;
            }
            if !self.live.contains_key(key) {
                if self.round_down {
                    return None;
                }
                let api = self.api(kind, key.namespace.as_deref());
                match call(self.timing.call, api.get(&m.name)).await {
                    Ok(obj) => {
                        self.live.insert(
                            key.clone(),
                            serde_json::to_value(&obj).unwrap_or(Value::Null),
                        );
                    }
                    Err(e) if transient(&e) => {
                        self.failed(&e);
                        return None;
                    }
                    Err(e) => {
                        broken.push(format!("{key}: {}", explain(&e)));
                        continue;
                    }
                }
            }
            match self.live.get(key).map(|o| rollout::status(&key.kind, o)) {
                Some(Rollout::Waiting(why)) => moving.push(why),
                Some(Rollout::Failed(why)) => broken.push(why),
                Some(Rollout::Done) | None => {}
            }
        }
        let fights: Vec<String> = prepared
            .iter()
            .filter_map(|(key, ..)| {
                let f = self.fights.get(key).filter(|f| {
                    f.repairs > FIGHT && now.duration_since(f.last) < FIGHT_FORGOTTEN
                })?;
                Some(format!(
                    "{key} keeps being changed{}; repairs are spaced out",
                    f.by.as_ref()
                        .map(|b| format!(" by {b}"))
                        .unwrap_or_default()
                ))
            })
            .collect();
        let rec = self.store.inv.apps.get_mut(app)?;
        let mut notes = Vec::new();
        let state = if !broken.is_empty() {
            notes.extend(broken);
            WorkloadState::Failed
        } else if !moving.is_empty() {
            if rec.running_version != version
                && let Some(v) = &version
            {
                notes.push(format!("rolling out {v}"));
            }
            notes.extend(moving);
            WorkloadState::Pending
        } else {
            rec.running_version = version.clone();
            WorkloadState::Running
        };
        notes.extend(fights);
        if !spaced.is_empty() && notes.is_empty() {
            tracing::debug!(%app, objects = spaced.len(), "repairs spaced out");
        }
        if !pending.is_empty() {
            notes.push(format!("pending removal: {}", pending.join(", ")));
        }
        let running = rec.running_version.clone();
        self.save();
        Some(report(
            state,
            (!notes.is_empty()).then(|| notes.join("; ")),
            running,
        ))
    }

    /// Objects of `want`'s kinds in the cluster that carry `app`'s labels.
    /// `None`: the API server is away.
    async fn adopt(
        &mut self,
        app: &str,
        want: &[(ObjKey, Kind, &Manifest)],
    ) -> Option<BTreeMap<ObjKey, ObjRecord>> {
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
            if self.round_down {
                return None;
            }
            let api = self.api(&kind, wk.namespace.as_deref());
            let lp = ListParams::default().labels(&objects::selector(Some(app)));
            match call(self.timing.call, api.list(&lp)).await {
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
                Err(e) if transient(&e) => {
                    self.failed(&e);
                    return None;
                }
                // Not allowed to list: adopt nothing, apply anyway.
                Err(e) => tracing::debug!(%app, error = %explain(&e), "adoption list"),
            }
        }
        if !found.is_empty() {
            tracing::info!(%app, objects = found.len(), "adopted objects labelled as this app's");
        }
        Some(found)
    }

    /// Makes sure the app's namespace exists: creates it (marked as Shoal's,
    /// its UID recorded) only when it does not; never applies one it found.
    async fn ensure_namespace(&mut self, app: &str, ns: &str) -> Result<(), Fail> {
        if self.known_ns.contains(ns) {
            return Ok(());
        }
        if self.round_down {
            return Err(Fail::Down(String::new()));
        }
        let api = self.api(&namespace_kind(), None);
        match call(self.timing.call, api.get_opt(ns)).await {
            Ok(Some(found)) if found.metadata.deletion_timestamp.is_some() => {
                return Err(Fail::No(format!(
                    "namespace {ns} is being deleted; waiting until it is gone"
                )));
            }
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
            Err(e) => return Err(self.failed(&e).context(&format!("namespace {ns}"))),
        }
        // Recorded before it is made: a crash in between leaves a record
        // that the missing annotation makes harmless.
        self.store.inv.namespaces.insert(ns.to_string(), None);
        if !self.save() {
            self.store.inv.namespaces.remove(ns);
            return Err(Fail::No(format!(
                "namespace {ns} not created: the kube inventory cannot be written"
            )));
        }
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": ns,
                "labels": { MANAGED_BY.0: MANAGED_BY.1 },
                "annotations": { CREATED_BY.0: CREATED_BY.1 },
            },
        }))
        .map_err(|e| Fail::No(format!("namespace {ns}: {e}")))?;
        match call(self.timing.call, api.create(&PostParams::default(), &obj)).await {
            Ok(made) => {
                tracing::info!(%app, %ns, "created the app's namespace");
                self.store
                    .inv
                    .namespaces
                    .insert(ns.to_string(), made.metadata.uid.clone());
                self.save();
                self.known_ns.insert(ns.to_string());
                Ok(())
            }
            Err(e) if code(&e) == Some(409) => {
                // Someone made it meanwhile: it is not Shoal's.
                self.store.inv.namespaces.remove(ns);
                self.save();
                self.known_ns.insert(ns.to_string());
                Ok(())
            }
            Err(e) if transient(&e) => Err(self.failed(&e)),
            Err(e) => {
                self.store.inv.namespaces.remove(ns);
                self.save();
                Err(Fail::No(format!(
                    "namespace {ns} does not exist and could not be created: {}",
                    explain(&e)
                )))
            }
        }
    }

    /// Deletes one object Shoal made for `app`. Done (`Ok`) when it was
    /// deleted, is gone, or the name now holds someone else's object.
    async fn delete(&mut self, app: &str, key: &ObjKey, rec: &ObjRecord) -> Result<(), Fail> {
        if self.round_down {
            return Err(Fail::Down(String::new()));
        }
        // A deletion refused a moment ago is not asked again at once.
        let now = Instant::now();
        if let Some((next, _)) = self.delete_retry.get(key)
            && *next > now
        {
            return Err(Fail::No(
                self.delete_retry
                    .get(key)
                    .map(|(_, why)| why.clone())
                    .unwrap_or_default(),
            ));
        }
        let r = self.delete_now(app, key, rec).await;
        match &r {
            Err(Fail::No(why)) => {
                let wait = self
                    .delete_wait
                    .get(key)
                    .map(|w| (*w * 2).min(self.timing.resync))
                    .unwrap_or(RETRY);
                self.delete_wait.insert(key.clone(), wait);
                self.delete_retry
                    .insert(key.clone(), (now + wait, why.clone()));
            }
            Ok(()) => {
                self.delete_wait.remove(key);
                self.delete_retry.remove(key);
                self.absent.remove(key);
            }
            Err(Fail::Down(_)) => {
                self.absent.remove(key);
            }
        }
        r
    }

    async fn delete_now(&mut self, app: &str, key: &ObjKey, rec: &ObjRecord) -> Result<(), Fail> {
        let kind = match self.resolve_any(&rec.api_version, &key.kind).await? {
            Some(k) => {
                self.absent.remove(key);
                k
            }
            // No version of its group serves the kind. Right after a reboot
            // a CRD's group can be missing for a moment: only an absence
            // that lasts a minute means nothing of it is left.
            None => {
                // (first seen absent, last seen absent): an absence not seen
                // for a while (an outage, the app back meanwhile) starts over.
                let now = Instant::now();
                let e = self.absent.entry(key.clone()).or_insert((now, now));
                if now.duration_since(e.1) > 2 * self.timing.resync {
                    *e = (now, now);
                }
                e.1 = now;
                let since = e.0;
                if since.elapsed() >= ABSENT {
                    return Ok(());
                }
                return Err(Fail::No(format!(
                    "the cluster does not serve {} now; taken as gone if that lasts {} s",
                    key.kind,
                    ABSENT.as_secs()
                )));
            }
        };
        let uid = match &rec.uid {
            Some(u) if !rec.unverified => u.clone(),
            // Not confirmed: delete only the object Shoal made (its UID) or
            // one that carries this app's labels.
            _ => match self.claim(app, key, &kind, rec.uid.as_deref()).await? {
                Claim::Ours(Some(u)) => u,
                Claim::Free | Claim::Foreign(_) | Claim::Ours(None) => return Ok(()),
            },
        };
        if key.group == "apiextensions.k8s.io" && key.kind == "CustomResourceDefinition" {
            self.crd_unused(app, key, &kind).await?;
        }
        let api = self.api(&kind, key.namespace.as_deref());
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match call(self.timing.call, api.delete(&key.name, &dp)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s))
                if s.code == 404 && s.details.as_ref().is_some_and(|d| d.name == key.name) =>
            {
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                // Not the object: the resource itself is not served here.
                self.disco
                    .remove(&(rec.api_version.clone(), key.kind.clone()));
                Err(Fail::No(format!("not found: {}", s.message)))
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // The UID precondition, or something else: look.
                match call(self.timing.call, api.get_opt(&key.name)).await {
                    Ok(None) => Ok(()),
                    Ok(Some(o)) if o.metadata.uid.as_deref() != Some(uid.as_str()) => Ok(()),
                    Ok(Some(_)) => Err(Fail::No(format!("conflict: {}", s.message))),
                    Err(e) => Err(self.failed(&e)),
                }
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// Deletes what Shoal made for an app that left; `None` once all gone.
    async fn remove_app(&mut self, app: &str) -> Option<WorkloadReport> {
        let rec = self.store.inv.apps.get(app)?.clone();
        let mut pending = Vec::new();
        let mut away = false;
        for (key, o) in &rec.objects {
            match self.delete(app, key, o).await {
                Ok(()) => {
                    tracing::info!(%app, object = %key, "deleted: the app left this node");
                    if let Some(r) = self.store.inv.apps.get_mut(app) {
                        r.objects.remove(key);
                    }
                    self.live.remove(key);
                    self.drifted.remove(key);
                }
                Err(Fail::Down(_)) => {
                    away = true;
                    pending.push(key.to_string());
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
        let why = if away {
            " (the Kubernetes API server is unreachable)"
        } else {
            ""
        };
        Some(report(
            WorkloadState::Stopped,
            Some(format!(
                "removing; pending removal: {}{why}",
                pending.join(", ")
            )),
            rec.running_version,
        ))
    }

    /// A CustomResourceDefinition Shoal made is deleted only when no object
    /// of its kind but this app's is left: deleting it would delete them all.
    async fn crd_unused(&mut self, app: &str, key: &ObjKey, kind: &Kind) -> Result<(), Fail> {
        let api = self.api(kind, None);
        let crd = match call(self.timing.call, api.get_opt(&key.name)).await {
            Ok(Some(c)) => serde_json::to_value(&c).unwrap_or(Value::Null),
            Ok(None) => return Ok(()),
            Err(e) => return Err(self.failed(&e)),
        };
        let group = crd
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or("");
        let plural = crd
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or("");
        let crd_kind = crd
            .pointer("/spec/names/kind")
            .and_then(Value::as_str)
            .unwrap_or("");
        let Some(version) = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .and_then(|vs| {
                vs.iter()
                    .find(|v| v.get("served").and_then(Value::as_bool) == Some(true))
            })
            .and_then(|v| v.get("name")?.as_str())
        else {
            return Ok(());
        };
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, crd_kind),
            plural,
        );
        let all: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        // Page by page, stopping at the first object that is not this app's.
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default().limit(500);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let list = match call(self.timing.call, all.list(&lp)).await {
                Ok(l) => l,
                Err(e) if code(&e) == Some(404) => return Ok(()),
                Err(e) if transient(&e) => return Err(self.failed(&e)),
                Err(e) => {
                    return Err(Fail::No(format!(
                        "cannot list {crd_kind} objects to see whether others use the \
                         CustomResourceDefinition: {}",
                        explain(&e)
                    )));
                }
            };
            let foreign = list.items.iter().any(|o| {
                let v = serde_json::to_value(o).unwrap_or(Value::Null);
                !labelled_for(&v, app)
            });
            if foreign {
                return Err(Fail::No(format!(
                    "{crd_kind} objects that are not this app's still exist; deleting the \
                     CustomResourceDefinition would delete them too"
                )));
            }
            token = list.metadata.continue_.filter(|t| !t.is_empty());
            if token.is_none() {
                return Ok(());
            }
        }
    }

    /// Deletes the namespaces Shoal created that no app uses any more, if
    /// they still carry Shoal's mark (and, when recorded, the same UID).
    /// Returns whether none is left to delete.
    async fn collect_namespaces(&mut self) -> bool {
        let unused: Vec<(String, Option<String>)> = self
            .store
            .inv
            .namespaces
            .iter()
            .filter(|(ns, _)| !self.store.namespace_in_use(ns))
            .map(|(ns, uid)| (ns.clone(), uid.clone()))
            .collect();
        let api = self.api(&namespace_kind(), None);
        let mut all = true;
        for (ns, recorded) in unused {
            if self.round_down {
                return false;
            }
            let done = match call(self.timing.call, api.get_opt(&ns)).await {
                Ok(None) => true,
                Ok(Some(obj)) => {
                    let marked = obj
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(CREATED_BY.0))
                        .is_some_and(|v| v == CREATED_BY.1);
                    let same = recorded.is_none() || recorded == obj.metadata.uid;
                    if !marked || !same {
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
                                self.failed(&e);
                                tracing::warn!(%ns, error = %explain(&e), "namespace not deleted yet");
                                false
                            }
                        }
                    }
                }
                Err(e) => {
                    self.failed(&e);
                    tracing::debug!(%ns, error = %explain(&e), "namespace not deleted yet");
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
            let task = tokio::spawn(
                watcher::run(api, wk.clone(), self.seen_tx.clone(), self.timing.call)
                    .in_current_span()
                    .instrument(
                        tracing::debug_span!("watch", kind = %kind.ar.kind, namespace = ?wk.namespace),
                    ),
            );
            self.watches.insert(wk, task);
        }
    }
}
