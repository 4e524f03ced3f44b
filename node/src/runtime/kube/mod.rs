//! The kube runtime: an app's Kubernetes manifests applied to the local
//! K3s through the Kubernetes API.
//!
//! What it owns: the objects it created and the namespaces it created,
//! nothing else. Every object is applied with server-side apply (field
//! manager `shoal`, forced, `fieldValidation=Strict`), labelled
//! `app.kubernetes.io/managed-by=shoal` and `shoal.dev/app=<app>`, and
//! recorded in the node's data dir ([`inventory`]) *before* it is applied;
//! nothing is applied while that record cannot be written. An object that
//! already exists without this app's labels is not taken over: the app
//! fails and names it. An object claimed by two apps fails the second. An
//! app lives in its namespace (`spec.kube.namespace`, default
//! `shoal-<app>`): Shoal creates that namespace only when it does not exist
//! (marked `shoal.dev/created-by=shoal`, its UID recorded) and never applies
//! or deletes a namespace it found; a `Namespace` object in the manifests is
//! refused. Kinds are resolved by API discovery (cached, refreshed on a
//! miss), so CRDs with irregular plurals work, and a CRD shipped in the same
//! app is applied first; cluster-scoped kinds are refused unless the app
//! sets `spec.kube.allow_cluster_scoped`.
//!
//! What it prunes: objects recorded for an app but no longer in its
//! manifests (compared by group, kind, namespace and name; an object that
//! moved to another apiVersion is the same object and is kept — an alias
//! across groups is recognised by its UID), after every object of the app
//! applied. An app that left the node's share has every recorded object
//! deleted, then its namespace if Shoal created it and no other app uses
//! it. Deletion names the object's UID (a record without one is looked up
//! first and deleted only if it carries the app's labels), so an object
//! someone else re-created under the same name is never touched. What
//! cannot be deleted now (API server down, a refusal) stays recorded and is
//! retried, across restarts; the report says what is pending.
//!
//! What it watches: per kind and namespace in use, a label-selected watch
//! of Shoal's objects. An object deleted by hand, or with a field Shoal set
//! changed by another writer (Shoal's managed fields change), is re-applied
//! at once; only that object is patched. A writer that keeps changing the
//! same object is not fought in a tight loop: repeated repairs are spaced
//! out (up to 5 minutes) and reported. An app whose manifests did not
//! change is not patched at all; every 5 minutes everything is re-applied
//! as a backstop.
//!
//! What it gives pods: the app's artifacts (read-only hostPath files), and,
//! on a node with a site API, `SHOAL_SITE_API` and `SHOAL_APP_TOKEN`, the
//! token from a Secret `shoal-<app>-token` that Shoal adds to the app's
//! objects (applied, recorded, watched and pruned like them), never
//! written into the pod template itself.
//!
//! What it reports: the rollout status of Deployments, StatefulSets and
//! DaemonSets as `kubectl rollout status` says it ([`rollout`]), with the
//! version whose rollout last completed (not the one being rolled out).
//! Refusals map to a failed workload with the API server's words (403,
//! 409, 400/422 with the offending field, "no matches for kind … install
//! its CRD first"), retried with backoff (1 s doubling to 10 s). An API
//! server that cannot be reached, does not answer within the request limit,
//! or whose `/readyz` fails makes every workload `unknown`, with the time it went
//! away and the last known state (the workloads probably still run); the
//! words stay the same until it is back, so the node's document is not
//! rewritten every round.

mod inventory;
mod objects;
mod reconciler;
pub mod rollout;
mod watcher;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tracing::Instrument;

use anyhow::Context;
use crdt_state::fleet::model::WorkloadReport;
use crdt_state::fleet::placement::Workload;
use kube::core::ApiResource;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use inventory::{CREATED_BY, InventoryError, ObjKey};
pub use objects::{APP_LABEL, MANAGED_BY};

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
    let mut config = match kubeconfig {
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
    prepare(&mut config);
    Ok(kube::Client::try_from(config)?)
}

/// What the runtime changes in any client configuration: no blind retries
/// inside the client (kube's default retries a 503 three times over about
/// 3.5 s, per request); the reconciler retries whole rounds itself and
/// says meanwhile that the server is in trouble.
pub fn prepare(config: &mut kube::Config) {
    config.default_retry = false;
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
        let store = inventory::Stored::open(dir)?;
        let (desired, rx) = watch::channel(Vec::new());
        let status: Status = Arc::default();
        let (seen_tx, seen_rx) = mpsc::channel(1024);
        let rec = reconciler::Reconciler::new(client, timing, store, seen_tx, status.clone());
        let task = tokio::spawn(
            rec.run(rx, seen_rx)
                .instrument(tracing::info_span!("kube_reconciler")),
        );
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

/// Did the request fail because the API server could not be reached?
fn unreachable(e: &kube::Error) -> bool {
    matches!(
        e,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_)
    )
}

/// Did the request fail because the API server could not be reached (or
/// did not answer in time)? Any answer — a 503 from one aggregated API, a
/// failing webhook's 500 — is the failure of the request that met it; a
/// 503 or 429 also has the next round probe `/readyz`, which decides
/// whether the whole server is away.
fn transient(e: &kube::Error) -> bool {
    unreachable(e)
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
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
            format!("no answer within {limit:?}").into(),
        )),
    }
}

/// Why a step failed.
#[derive(Debug)]
enum Fail {
    /// The API server could not be reached or is in trouble: the workloads
    /// probably still run.
    Down(String),
    /// The API server refused, or the input is wrong.
    No(String),
}

impl Fail {
    fn of(e: &kube::Error) -> Fail {
        if transient(e) {
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

/// A time as `2026-11-27T18:12:01Z` (UTC).
pub fn utc(t: SystemTime) -> String {
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    daemon::render::utc(ms, false)
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
