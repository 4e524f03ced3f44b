//! The kube runtime: an app's Kubernetes manifests applied to the local
//! K3s through the Kubernetes API.
//!
//! Per app, into a namespace Shoal owns (`spec.kube.namespace`, default
//! `shoal-<app>`): the namespace and every object are applied with
//! server-side apply (field manager `shoal`, forced: Shoal's desired state
//! wins over other managers' fields it sets), labelled
//! `app.kubernetes.io/managed-by=shoal` and `shoal.dev/app=<app>`. Objects
//! of the app that left the desired state are deleted (found by those
//! labels, so a restarted node still prunes); an app removed from the
//! node's share has its namespace deleted, if Shoal made it. Rollout status
//! is read back from Deployments, StatefulSets and DaemonSets. Cluster-
//! scoped kinds are refused: an app lives in its namespace.
//!
//! Errors map to a failed workload with a reason an operator can act on:
//! 403 forbidden (RBAC), 409 conflict, 422 invalid object, the API server
//! unreachable. The work runs in a background task; `reconcile` hands it
//! the latest desired state. An app is applied when its spec changed (and
//! every 5 minutes, to correct drift); rollout status is read every 10 s.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use crdt_state::model::{RuntimeKind, WorkloadReport, WorkloadState};
use crdt_state::placement::Workload;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "shoal";
/// Label on everything Shoal applies.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "shoal");
/// Label naming the app an object belongs to.
pub const APP_LABEL: &str = "shoal.dev/app";
const RESYNC: Duration = Duration::from_secs(10);
const REAPPLY: Duration = Duration::from_secs(300);

const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "Node",
    "PersistentVolume",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "APIService",
];

type Status = Arc<Mutex<BTreeMap<String, WorkloadReport>>>;

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
    /// A runtime applying through `client` (see [`client`]).
    pub fn new(client: kube::Client) -> Kube {
        install_crypto();
        let (desired, rx) = watch::channel(Vec::new());
        let status: Status = Arc::default();
        let task = tokio::spawn(run(client, rx, status.clone()));
        Kube {
            desired,
            status,
            task: Some(task),
        }
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
            }
        })
    }
}

/// One object Shoal applied.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Obj {
    api_version: String,
    kind: String,
    name: String,
}

impl Obj {
    fn resource(&self) -> ApiResource {
        let (group, version) = match self.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", self.api_version.as_str()),
        };
        ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &self.kind))
    }
}

/// Per app: its namespace, the objects applied, and the spec applied.
type Applied = BTreeMap<String, (String, BTreeSet<Obj>, String)>;

async fn run(client: kube::Client, mut rx: watch::Receiver<Vec<Workload>>, status: Status) {
    let mut applied: Applied = BTreeMap::new();
    let mut last_full = tokio::time::Instant::now();
    loop {
        let desired = rx.borrow_and_update().clone();
        let full = last_full.elapsed() >= REAPPLY;
        if full {
            last_full = tokio::time::Instant::now();
        }
        round(&client, &desired, &mut applied, &status, full).await;
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
}

fn report(state: WorkloadState, reason: Option<String>, version: Option<String>) -> WorkloadReport {
    WorkloadReport {
        state,
        reason,
        restarts: 0,
        version,
    }
}

/// One pass: apply every desired app whose spec changed (every app when
/// `full`), prune, read rollout status, delete the namespaces of apps that
/// left.
async fn round(
    client: &kube::Client,
    desired: &[Workload],
    applied: &mut Applied,
    status: &Status,
    full: bool,
) {
    let mut out = BTreeMap::new();
    let mut wanted = BTreeSet::new();
    for w in desired {
        let version = w.spec.version.clone();
        let Some(spec) = w
            .spec
            .kube
            .as_ref()
            .filter(|_| w.spec.runtime == RuntimeKind::Kube)
        else {
            out.insert(
                w.app.clone(),
                report(
                    WorkloadState::Failed,
                    Some("the app runs natively; this node runs the kube runtime".into()),
                    version,
                ),
            );
            continue;
        };
        wanted.insert(w.app.clone());
        let ns = spec
            .namespace
            .clone()
            .unwrap_or_else(|| format!("shoal-{}", w.app));
        let key = serde_json::to_string(w).unwrap_or_default();
        if !full
            && let Some((ns, objs, k)) = applied.get(&w.app)
            && *k == key
        {
            out.insert(w.app.clone(), rollout(client, ns, objs, version).await);
            continue;
        }
        let r = match apply_app(client, &w.app, &ns, &spec.manifests).await {
            Ok(objs) => {
                let previous = applied
                    .get(&w.app)
                    .map(|(_, o, _)| o.clone())
                    .unwrap_or_default();
                if let Err(e) = prune(client, &w.app, &ns, &previous, &objs).await {
                    report(WorkloadState::Failed, Some(e), version)
                } else {
                    let r = rollout(client, &ns, &objs, version).await;
                    applied.insert(w.app.clone(), (ns, objs, key));
                    r
                }
            }
            Err(reason) => {
                // Applied again on the next pass.
                applied.remove(&w.app);
                report(WorkloadState::Failed, Some(reason), version)
            }
        };
        out.insert(w.app.clone(), r);
    }
    let gone: Vec<String> = applied
        .keys()
        .filter(|a| !wanted.contains(*a))
        .cloned()
        .collect();
    for app in gone {
        if let Some((ns, _, _)) = applied.remove(&app)
            && let Err(e) = remove_namespace(client, &ns).await
        {
            tracing::warn!(%app, %ns, error = %e, "namespace not removed");
        }
    }
    if let Ok(mut s) = status.lock() {
        *s = out;
    }
}

/// What went wrong, in an operator's words.
pub fn explain(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => match s.code {
            401 => format!(
                "unauthorized: the kubeconfig's credentials were refused ({})",
                s.message
            ),
            403 => format!("forbidden: {}", s.message),
            404 => format!("not found: {}", s.message),
            409 => format!("conflict: {}", s.message),
            422 => format!("invalid: {}", s.message),
            c => format!("API server answered {c}: {}", s.message),
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            format!("Kubernetes API server unreachable: {e}")
        }
        other => format!("Kubernetes API: {other}"),
    }
}

fn labels(app: &str) -> Value {
    json!({ MANAGED_BY.0: MANAGED_BY.1, APP_LABEL: app })
}

/// Parses the manifests and applies the namespace and every object.
async fn apply_app(
    client: &kube::Client,
    app: &str,
    ns: &str,
    manifests: &str,
) -> Result<BTreeSet<Obj>, String> {
    let mut objects = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(manifests).enumerate() {
        let v: Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| format!("manifest {}: not YAML: {e}", i + 1))?;
        if v.is_null() {
            continue;
        }
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| format!("manifest {}: missing {k}", i + 1))
        };
        let (api_version, kind) = (field("apiVersion")?, field("kind")?);
        let name = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| format!("manifest {}: missing metadata.name", i + 1))?;
        if CLUSTER_SCOPED.contains(&kind.as_str()) {
            return Err(format!(
                "manifest {}: {kind} {name} is cluster-scoped; an app's objects live in its namespace {ns}",
                i + 1
            ));
        }
        objects.push((
            Obj {
                api_version,
                kind,
                name,
            },
            v,
        ));
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let namespaces: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Namespace")),
    );
    let ns_obj = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": ns, "labels": labels(app) },
    });
    namespaces
        .patch(ns, &pp, &Patch::Apply(&ns_obj))
        .await
        .map_err(|e| format!("namespace {ns}: {}", explain(&e)))?;
    let mut done = BTreeSet::new();
    for (obj, mut v) in objects {
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("namespace".into(), json!(ns));
            let mut l = meta
                .get("labels")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            if let Some(ours) = labels(app).as_object() {
                l.extend(ours.clone());
            }
            meta.insert("labels".into(), Value::Object(l));
        }
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &obj.resource());
        api.patch(&obj.name, &pp, &Patch::Apply(&v))
            .await
            .map_err(|e| format!("{} {}: {}", obj.kind, obj.name, explain(&e)))?;
        done.insert(obj);
    }
    Ok(done)
}

/// Deletes the app's objects that are no longer in its manifests: every
/// kind applied before or now is listed by the app's label.
async fn prune(
    client: &kube::Client,
    app: &str,
    ns: &str,
    previous: &BTreeSet<Obj>,
    current: &BTreeSet<Obj>,
) -> Result<(), String> {
    let kinds: BTreeSet<(String, String)> = previous
        .iter()
        .chain(current.iter())
        .map(|o| (o.api_version.clone(), o.kind.clone()))
        .collect();
    let selector = format!("{}={},{APP_LABEL}={app}", MANAGED_BY.0, MANAGED_BY.1);
    for (api_version, kind) in kinds {
        let probe = Obj {
            api_version: api_version.clone(),
            kind: kind.clone(),
            name: String::new(),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &probe.resource());
        let list = api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| format!("listing {kind}: {}", explain(&e)))?;
        for item in list.items {
            let Some(name) = item.metadata.name.clone() else {
                continue;
            };
            let keep = current
                .iter()
                .any(|o| o.kind == kind && o.api_version == api_version && o.name == name);
            if !keep {
                tracing::info!(%app, %kind, %name, "pruning: left the desired state");
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(format!("deleting {kind} {name}: {}", explain(&e))),
                }
            }
        }
    }
    Ok(())
}

/// Reads rollout status from the app's workload objects.
async fn rollout(
    client: &kube::Client,
    ns: &str,
    objs: &BTreeSet<Obj>,
    version: Option<String>,
) -> WorkloadReport {
    let mut waiting = Vec::new();
    for o in objs {
        if !matches!(o.kind.as_str(), "Deployment" | "StatefulSet" | "DaemonSet") {
            continue;
        }
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &o.resource());
        let obj = match api.get(&o.name).await {
            Ok(obj) => obj,
            Err(e) => {
                return report(
                    WorkloadState::Failed,
                    Some(format!("{} {}: {}", o.kind, o.name, explain(&e))),
                    version,
                );
            }
        };
        let d = &obj.data;
        let num = |p: &str| d.pointer(p).and_then(Value::as_i64).unwrap_or(0);
        let (available, want) = if o.kind == "DaemonSet" {
            (
                num("/status/numberAvailable"),
                num("/status/desiredNumberScheduled"),
            )
        } else {
            (
                num("/status/availableReplicas"),
                d.pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(1),
            )
        };
        if available < want {
            let why = d
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c.get("status").and_then(Value::as_str) == Some("False"))
                })
                .and_then(|c| c.get("message").and_then(Value::as_str))
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            waiting.push(format!(
                "{} {} {available}/{want} available{why}",
                o.kind, o.name
            ));
        }
    }
    if waiting.is_empty() {
        report(WorkloadState::Running, None, version)
    } else {
        report(WorkloadState::Pending, Some(waiting.join("; ")), version)
    }
}

/// Deletes a namespace Shoal made (it carries the managed-by label).
async fn remove_namespace(client: &kube::Client, ns: &str) -> Result<(), String> {
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Namespace")),
    );
    let obj = match api.get(ns).await {
        Ok(o) => o,
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(e) => return Err(explain(&e)),
    };
    let ours = obj
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .is_some_and(|v| v == MANAGED_BY.1);
    if !ours {
        return Ok(());
    }
    tracing::info!(%ns, "deleting the namespace of an app that left this node");
    match api.delete(ns, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(explain(&e)),
    }
}
