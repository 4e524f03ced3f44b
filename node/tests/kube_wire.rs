//! The kube runtime at the wire. No Kubernetes API server can be installed
//! on these machines, so these tests run it against a stateful stand-in
//! (`support/apiserver.rs`, named as such: discovery, server-side apply,
//! managed fields, label-selected lists and watches, deletion with UID
//! preconditions) and check the exact requests the runtime makes and what
//! it reports. The same behaviours are checked against a real cluster in
//! `kube_real.rs` (`#[ignore]`, `SHOAL_IT_KUBECONFIG`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/apiserver.rs"]
mod apiserver;
#[path = "support/kubetest.rs"]
mod kubetest;

use std::path::Path;
use std::time::{Duration, Instant};

use apiserver::{ApiServer, Seen};
use crdt_state::fleet::model::{RuntimeKind, WorkloadReport, WorkloadState};
use kubetest::{CFG, CFG2, DEPLOY, HPA_V1, HPA_V2, app, manifests, until, with_site_api};
use node::runtime::Runtime;
use node::runtime::kube::{Kube, Timing};
use serde_json::json;

fn client(url: &str) -> kube::Client {
    node::runtime::kube::install_crypto();
    let mut config = kube::Config::new(url.parse().unwrap());
    node::runtime::kube::prepare(&mut config);
    kube::Client::try_from(config).unwrap()
}

async fn until_state(rt: &Kube, app: &str, state: WorkloadState) -> WorkloadReport {
    kubetest::until_state(rt, app, state, Duration::from_secs(10)).await
}

fn runtime(server: &ApiServer, dir: &Path) -> Kube {
    Kube::new(client(&server.url()), dir).unwrap()
}

/// Marks the Deployment's rollout complete, as its controller would.
fn complete(server: &ApiServer, ns: &str, name: &str) {
    let d = server.get("apps/v1", "Deployment", Some(ns), name).unwrap();
    let generation = d["metadata"]["generation"].as_i64().unwrap_or(1);
    server.set_status(
        "apps/v1",
        "Deployment",
        Some(ns),
        name,
        json!({"observedGeneration": generation, "replicas": 2, "updatedReplicas": 2,
               "readyReplicas": 2, "availableReplicas": 2}),
    );
}

fn patches(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.method == "PATCH")
        .map(|s| s.path.clone())
        .collect()
}

/// Waits up to 10 s for an object to be gone from the server.
async fn vanishes(
    server: &ApiServer,
    api_version: &str,
    kind: &str,
    ns: Option<&str>,
    name: &str,
) -> bool {
    kubetest::eventually(Duration::from_secs(10), || {
        server.get(api_version, kind, ns, name).is_none()
    })
    .await
}

/// Waits up to 10 s for an object to be on the server.
async fn appears(
    server: &ApiServer,
    api_version: &str,
    kind: &str,
    ns: Option<&str>,
    name: &str,
) -> bool {
    kubetest::eventually(Duration::from_secs(10), || {
        server.get(api_version, kind, ns, name).is_some()
    })
    .await
}

/// A CustomResourceDefinition of `Cactus` (plural `cacti`).
const CRD: &str = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: cacti.botany.example.com}\nspec: {group: botany.example.com, scope: Namespaced, names: {plural: cacti, singular: cactus, kind: Cactus}, versions: [{name: v1, served: true, storage: true}]}\n";

/// Has the runtime started a watch?
fn watching(server: &ApiServer) -> bool {
    server
        .requests()
        .iter()
        .any(|s| s.method == "GET" && s.query.contains("watch=true"))
}

fn deletes(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.path.clone())
        .collect()
}

#[tokio::test]
async fn applies_into_a_namespace_it_creates_and_reports_rollout_as_kubectl() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app("web", "v3", None, manifests(&[DEPLOY, CFG]))]);
    let r = until_state(&rt, "web", WorkloadState::Pending).await;
    // The controller has not looked at the Deployment yet.
    assert!(
        r.reason.as_deref().unwrap().contains("rolling out v3"),
        "{r:?}"
    );
    assert_eq!(r.version, None, "nothing has completed a rollout yet");
    let seen = server.requests();
    // The namespace did not exist: created (POST), marked as Shoal's, never patched.
    let posts: Vec<&Seen> = seen.iter().filter(|s| s.method == "POST").collect();
    assert_eq!(posts.len(), 1, "{seen:?}");
    assert_eq!(posts[0].path, "/api/v1/namespaces");
    assert_eq!(
        posts[0].body["metadata"]["annotations"]["shoal.dev/created-by"],
        "shoal"
    );
    assert_eq!(
        patches(&seen),
        vec![
            "/apis/apps/v1/namespaces/shoal-web/deployments/web",
            "/api/v1/namespaces/shoal-web/configmaps/cfg",
        ]
    );
    for p in seen.iter().filter(|s| s.method == "PATCH") {
        assert_eq!(p.content_type, "application/apply-patch+yaml");
        assert!(p.query.contains("fieldManager=shoal"), "{}", p.query);
        assert!(p.query.contains("force=true"), "{}", p.query);
        assert!(p.query.contains("fieldValidation=Strict"), "{}", p.query);
        assert_eq!(
            p.body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "shoal"
        );
        assert_eq!(p.body["metadata"]["labels"]["shoal.dev/app"], "web");
        assert_eq!(p.body["metadata"]["namespace"], "shoal-web");
    }
    // The app's own labels are kept beside Shoal's.
    let cfg = server
        .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
        .unwrap();
    assert_eq!(cfg["metadata"]["labels"]["tier"], "edge");

    // Mid-rollout, as kubectl says it.
    server.set_status(
        "apps/v1",
        "Deployment",
        Some("shoal-web"),
        "web",
        json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 1}),
    );
    let s = until(&rt, Duration::from_secs(10), |s| {
        s["web"]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("1 out of 2 new replicas"))
    })
    .await;
    assert_eq!(s["web"].state, WorkloadState::Pending, "{s:?}");
    complete(&server, "shoal-web", "web");
    let r = until_state(&rt, "web", WorkloadState::Running).await;
    assert_eq!(r.version.as_deref(), Some("v3"));

    // The same desired state again: no write at all.
    server.clear_requests();
    rt.reconcile(&[app("web", "v3", None, manifests(&[DEPLOY, CFG]))]);
    // A change of another app is a round that must come after this one.
    rt.reconcile(&[
        app("web", "v3", None, manifests(&[DEPLOY, CFG])),
        app("other", "v1", None, manifests(&[CFG2])),
    ]);
    until_state(&rt, "other", WorkloadState::Running).await;
    let seen = server.requests();
    assert!(
        !seen
            .iter()
            .any(|s| s.method != "GET" && s.path.contains("shoal-web")),
        "{seen:?}"
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_new_version_is_reported_only_once_rolled_out_and_a_deadline_fails_it() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app("web", "v3", None, manifests(&[DEPLOY]))]);
    until_state(&rt, "web", WorkloadState::Pending).await;
    complete(&server, "shoal-web", "web");
    until_state(&rt, "web", WorkloadState::Running).await;

    // v4 changes the image: one PATCH, of the Deployment only.
    server.clear_requests();
    let v4 = DEPLOY.replace("IMAGE", "1.28");
    rt.reconcile(&[app("web", "v4", None, v4.clone())]);
    let r = until_state(&rt, "web", WorkloadState::Pending).await;
    assert_eq!(
        patches(&server.requests()),
        vec!["/apis/apps/v1/namespaces/shoal-web/deployments/web"]
    );
    assert_eq!(r.version.as_deref(), Some("v3"), "v3 still runs: {r:?}");
    assert!(
        r.reason.as_deref().unwrap().contains("rolling out v4"),
        "{r:?}"
    );
    server.set_status(
        "apps/v1",
        "Deployment",
        Some("shoal-web"),
        "web",
        json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 1,
               "conditions": [{"type": "Progressing", "status": "False",
                               "reason": "ProgressDeadlineExceeded",
                               "message": "ReplicaSet \"web-2\" has timed out progressing."}]}),
    );
    let r = until_state(&rt, "web", WorkloadState::Failed).await;
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("exceeded its progress deadline"),
        "{r:?}"
    );
    assert_eq!(r.version.as_deref(), Some("v3"));
    complete(&server, "shoal-web", "web");
    let r = until_state(&rt, "web", WorkloadState::Running).await;
    assert_eq!(r.version.as_deref(), Some("v4"));
    rt.shutdown().await;
}

#[tokio::test]
async fn a_namespace_it_found_and_other_apps_objects_survive_a_deletion() {
    let server = ApiServer::start().await;
    // Someone else's namespace, with their objects in it.
    server
        .put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "plant-floor"}}));
    server.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "theirs", "namespace": "plant-floor"}, "data": {"a": "b"}}));
    server.put(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                      "metadata": {"name": "their-app", "namespace": "plant-floor"}, "spec": {"replicas": 1}}));
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let a = app("a", "v1", Some("plant-floor"), manifests(&[CFG]));
    let b = app("b", "v1", Some("plant-floor"), manifests(&[CFG2]));
    rt.reconcile(&[a.clone(), b.clone()]);
    until_state(&rt, "a", WorkloadState::Running).await;
    until_state(&rt, "b", WorkloadState::Running).await;
    let seen = server.requests();
    // The namespace was read, never written.
    assert!(
        !seen.iter().any(|s| s.method != "GET"
            && (s.path == "/api/v1/namespaces" || s.path.ends_with("/namespaces/plant-floor"))),
        "{seen:?}"
    );
    // Deleting app a deletes a's object, nothing else.
    rt.reconcile(std::slice::from_ref(&b));
    assert!(vanishes(&server, "v1", "ConfigMap", Some("plant-floor"), "cfg").await);
    until(&rt, Duration::from_secs(10), |s| !s.contains_key("a")).await;
    assert_eq!(
        deletes(&server.requests()),
        vec!["/api/v1/namespaces/plant-floor/configmaps/cfg"]
    );
    // And b, the last app there: the namespace stays, with its owners' objects.
    rt.reconcile(&[]);
    until(&rt, Duration::from_secs(10), |s| s.is_empty()).await;
    assert!(rt.status().is_empty(), "{:?}", rt.status());
    assert!(server.get("v1", "Namespace", None, "plant-floor").is_some());
    assert!(
        server
            .get("v1", "ConfigMap", Some("plant-floor"), "theirs")
            .is_some()
    );
    assert!(
        server
            .get("apps/v1", "Deployment", Some("plant-floor"), "their-app")
            .is_some()
    );
    assert!(
        server
            .get("v1", "ConfigMap", Some("plant-floor"), "cfg2")
            .is_none()
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_namespace_it_created_goes_with_the_last_app_using_it() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let a = app("a", "v1", Some("shared"), manifests(&[CFG]));
    let b = app("b", "v1", Some("shared"), manifests(&[CFG2]));
    rt.reconcile(&[a.clone(), b.clone()]);
    until_state(&rt, "b", WorkloadState::Running).await;
    rt.reconcile(std::slice::from_ref(&b));
    until(&rt, Duration::from_secs(10), |s| !s.contains_key("a")).await;
    assert!(
        server
            .get("v1", "ConfigMap", Some("shared"), "cfg")
            .is_none()
    );
    assert!(
        server.get("v1", "Namespace", None, "shared").is_some(),
        "b still uses it"
    );
    rt.reconcile(&[]);
    assert!(vanishes(&server, "v1", "Namespace", None, "shared").await);
    rt.shutdown().await;
}

#[tokio::test]
async fn changes_made_while_the_api_server_is_down_converge_after_it_returns_and_a_restart() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let web = app("web", "v1", None, manifests(&[DEPLOY, CFG]));
    let gone = app("gone", "v1", None, manifests(&[CFG2]));
    rt.reconcile(&[web.clone(), gone.clone()]);
    until_state(&rt, "gone", WorkloadState::Running).await;
    complete(&server, "shoal-web", "web");
    until_state(&rt, "web", WorkloadState::Running).await;

    server.stop().await;
    // The API server is down: cfg leaves web's manifests, gone leaves the node.
    let web2 = app("web", "v1", None, manifests(&[DEPLOY]));
    rt.reconcile(std::slice::from_ref(&web2));
    let s = until(&rt, Duration::from_secs(10), |s| {
        s.get("web")
            .is_some_and(|r| r.state == WorkloadState::Unknown)
            && s.get("gone")
                .is_some_and(|r| r.state == WorkloadState::Stopped)
    })
    .await;
    let w = &s["web"];
    assert_eq!(w.state, WorkloadState::Unknown, "{s:?}");
    let why = w.reason.as_deref().unwrap();
    assert!(
        why.contains("unreachable") && why.contains("since 20"),
        "{why}"
    );
    assert!(why.contains("last known: running v1"), "{why}");
    assert_eq!(w.version.as_deref(), Some("v1"));
    assert!(
        s["gone"]
            .reason
            .as_deref()
            .unwrap()
            .contains("pending removal: ConfigMap cfg2"),
        "{s:?}"
    );
    // The node restarts before the API server is back.
    rt.shutdown().await;
    drop(rt);
    server.resume().await;
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(std::slice::from_ref(&web2));
    assert!(
        kubetest::eventually(Duration::from_secs(15), || server
            .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
            .is_none()
            && server.get("v1", "Namespace", None, "shoal-gone").is_none())
        .await,
        "{:?}",
        server.requests()
    );
    assert!(
        server
            .get("v1", "ConfigMap", Some("shoal-gone"), "cfg2")
            .is_none()
    );
    assert!(
        server
            .get("apps/v1", "Deployment", Some("shoal-web"), "web")
            .is_some()
    );
    let s = until(&rt, Duration::from_secs(10), |s| {
        s.len() == 1 && s["web"].state == WorkloadState::Running
    })
    .await;
    assert_eq!(s["web"].state, WorkloadState::Running, "{s:?}");
    rt.shutdown().await;
}

#[tokio::test]
async fn a_failed_apply_forgets_nothing_and_deleting_the_app_removes_what_was_made() {
    let server = ApiServer::start().await;
    server.refuse(
        "PATCH",
        "/deployments/web",
        422,
        "Invalid",
        "Deployment.apps \"web\" is invalid: spec.replicas: Invalid value: -1",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app("web", "v1", None, manifests(&[CFG, DEPLOY]))]);
    let r = until_state(&rt, "web", WorkloadState::Failed).await;
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .starts_with("Deployment web: invalid: Deployment.apps \"web\" is invalid"),
        "{r:?}"
    );
    assert!(
        server
            .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
            .is_some()
    );
    rt.reconcile(&[]);
    assert!(
        kubetest::eventually(Duration::from_secs(10), || server
            .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
            .is_none()
            && server.get("v1", "Namespace", None, "shoal-web").is_none())
        .await
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn an_api_version_change_keeps_the_object() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app("web", "v1", None, HPA_V1.into())]);
    until_state(&rt, "web", WorkloadState::Running).await;
    let uid = server
        .get(
            "autoscaling/v1",
            "HorizontalPodAutoscaler",
            Some("shoal-web"),
            "web",
        )
        .unwrap()["metadata"]["uid"]
        .clone();
    server.clear_requests();
    rt.reconcile(&[app("web", "v2", None, HPA_V2.into())]);
    let r = until(&rt, Duration::from_secs(10), |s| {
        s["web"].version.as_deref() == Some("v2")
    })
    .await;
    assert_eq!(r["web"].state, WorkloadState::Running, "{r:?}");
    let seen = server.requests();
    assert_eq!(
        patches(&seen),
        vec!["/apis/autoscaling/v2/namespaces/shoal-web/horizontalpodautoscalers/web"]
    );
    assert!(deletes(&seen).is_empty(), "{seen:?}");
    let hpa = server
        .get(
            "autoscaling/v2",
            "HorizontalPodAutoscaler",
            Some("shoal-web"),
            "web",
        )
        .unwrap();
    assert_eq!(hpa["metadata"]["uid"], uid);
    assert_eq!(hpa["spec"]["maxReplicas"], 4);
    rt.shutdown().await;
}

#[tokio::test]
async fn kinds_are_discovered_crds_too_and_cluster_scoped_ones_need_permission() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let cactus = "apiVersion: botany.example.com/v1\nkind: Cactus\nmetadata: {name: saguaro}\nspec: {spines: 1000}\n";
    rt.reconcile(&[app("garden", "v1", None, cactus.into())]);
    let r = until_state(&rt, "garden", WorkloadState::Failed).await;
    assert_eq!(
        r.reason.as_deref().unwrap(),
        "manifest 1: Cactus saguaro: no matches for kind \"Cactus\" in version \"botany.example.com/v1\": \
         the cluster does not serve it; install its CRD first"
    );
    // The CRD is installed; an irregular plural is found, not guessed.
    server.add_crd("botany.example.com", "v1", "Cactus", "cacti", true);
    // Retried with backoff (1 s doubling to 10 s): within 20 s.
    kubetest::until_state(
        &rt,
        "garden",
        WorkloadState::Running,
        Duration::from_secs(20),
    )
    .await;
    assert!(patches(&server.requests()).contains(
        &"/apis/botany.example.com/v1/namespaces/shoal-garden/cacti/saguaro".to_string()
    ));

    // A cluster-scoped kind the old list did not know: refused by default.
    let class = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: edge}\nspec: {controller: example.com/edge}\n";
    let mut w = app("ingress", "v1", None, class.into());
    rt.reconcile(std::slice::from_ref(&w));
    let r = until_state(&rt, "ingress", WorkloadState::Failed).await;
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("IngressClass edge is cluster-scoped")
            && r.reason
                .as_deref()
                .unwrap()
                .contains("allow_cluster_scoped"),
        "{r:?}"
    );
    assert!(
        server
            .get("networking.k8s.io/v1", "IngressClass", None, "edge")
            .is_none()
    );
    // Allowed: applied without a namespace, owned and deleted like the rest.
    w.spec.kube.as_mut().unwrap().allow_cluster_scoped = true;
    rt.reconcile(std::slice::from_ref(&w));
    until_state(&rt, "ingress", WorkloadState::Running).await;
    assert!(
        patches(&server.requests())
            .contains(&"/apis/networking.k8s.io/v1/ingressclasses/edge".to_string())
    );
    rt.reconcile(&[]);
    assert!(
        vanishes(
            &server,
            "networking.k8s.io/v1",
            "IngressClass",
            None,
            "edge"
        )
        .await
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn refusals_name_the_field_and_namespace_scoped_credentials_suffice() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    // A misspelt field: the API server's strict validation names it.
    let typo = DEPLOY.replace("image: nginx:IMAGE", "image: nginx, imagePulPolicy: Always");
    rt.reconcile(&[app("web", "v1", None, typo)]);
    let r = until_state(&rt, "web", WorkloadState::Failed).await;
    let why = r.reason.unwrap();
    assert!(
        why.starts_with("Deployment web: invalid: ") && why.contains("imagePulPolicy"),
        "{why}"
    );

    // An object that names another namespace is refused, not moved.
    rt.reconcile(&[app(
        "web",
        "v1",
        None,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: kube-system}\n".into(),
    )]);
    let s = until(&rt, Duration::from_secs(10), |s| {
        s["web"]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("kube-system"))
    })
    .await;
    assert!(
        s["web"].reason.as_deref().unwrap().contains(
            "ConfigMap c names namespace kube-system, but the app's objects live in shoal-web"
        ),
        "{s:?}"
    );
    assert!(
        server
            .get("v1", "ConfigMap", Some("kube-system"), "c")
            .is_none()
    );
    rt.shutdown().await;

    // Credentials bound to one namespace (a RoleBinding to `edit`): the
    // namespace cannot be read or made, yet the app applies.
    let server = ApiServer::start().await;
    server.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "granted"}}));
    for method in ["GET", "POST", "PATCH", "DELETE"] {
        server.refuse(
            method,
            "/api/v1/namespaces/granted$",
            403,
            "Forbidden",
            "namespaces \"granted\" is forbidden: User \"edge\" cannot get resource \"namespaces\" at the cluster scope",
        );
    }
    server.refuse(
        "POST",
        "/api/v1/namespaces$",
        403,
        "Forbidden",
        "namespaces is forbidden: User \"edge\" cannot create resource \"namespaces\"",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app("web", "v1", Some("granted"), manifests(&[CFG]))]);
    until_state(&rt, "web", WorkloadState::Running).await;
    assert!(
        server
            .get("v1", "ConfigMap", Some("granted"), "cfg")
            .is_some()
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn drift_is_repaired_from_the_watch_and_only_what_drifted_is_patched() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app("web", "v1", None, manifests(&[CFG, CFG2]))]);
    until_state(&rt, "web", WorkloadState::Running).await;
    // Wait for the watch to be running before touching anything.
    assert!(kubetest::eventually(Duration::from_secs(10), || watching(&server)).await);
    server.clear_requests();

    // Deleted by hand: back within seconds, by one PATCH.
    let t = Instant::now();
    server.delete_by_hand("v1", "ConfigMap", Some("shoal-web"), "cfg");
    assert!(appears(&server, "v1", "ConfigMap", Some("shoal-web"), "cfg").await);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(
        patches(&server.requests()),
        vec!["/api/v1/namespaces/shoal-web/configmaps/cfg"]
    );

    // A field Shoal set, changed by hand: set back.
    server.clear_requests();
    server.edit_by_hand("v1", "ConfigMap", Some("shoal-web"), "cfg2", |o| {
        o["data"]["k"] = json!("tampered");
    });
    assert!(
        kubetest::eventually(Duration::from_secs(10), || server
            .get("v1", "ConfigMap", Some("shoal-web"), "cfg2")
            .is_some_and(|o| o["data"]["k"] == "v"))
        .await
    );
    assert_eq!(
        patches(&server.requests()),
        vec!["/api/v1/namespaces/shoal-web/configmaps/cfg2"]
    );

    // A field Shoal never set (an annotation) is not Shoal's business. The
    // watch delivers events of one kind in order, so once the deletion that
    // follows it is repaired, the annotation's event was handled too.
    server.clear_requests();
    server.edit_by_hand("v1", "ConfigMap", Some("shoal-web"), "cfg2", |o| {
        o["metadata"]["annotations"] = json!({"note": "checked by hand"});
    });
    server.delete_by_hand("v1", "ConfigMap", Some("shoal-web"), "cfg");
    assert!(appears(&server, "v1", "ConfigMap", Some("shoal-web"), "cfg").await);
    assert_eq!(
        patches(&server.requests()),
        vec!["/api/v1/namespaces/shoal-web/configmaps/cfg"]
    );
    let cfg2 = server
        .get("v1", "ConfigMap", Some("shoal-web"), "cfg2")
        .unwrap();
    assert_eq!(cfg2["metadata"]["annotations"]["note"], "checked by hand");
    rt.shutdown().await;
}

#[tokio::test]
async fn a_restarted_node_patches_nothing_that_did_not_change() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let w = app("web", "v1", None, manifests(&[CFG, CFG2]));
    rt.reconcile(std::slice::from_ref(&w));
    until_state(&rt, "web", WorkloadState::Running).await;
    rt.shutdown().await;
    drop(rt);
    server.clear_requests();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(std::slice::from_ref(&w));
    until_state(&rt, "web", WorkloadState::Running).await;
    // The watch's first list is compared with what was recorded. The
    // ConfigMaps' watch delivers in order, so once a deletion made after
    // it is repaired, the list was handled: only that one object was sent.
    assert!(kubetest::eventually(Duration::from_secs(10), || watching(&server)).await);
    server.delete_by_hand("v1", "ConfigMap", Some("shoal-web"), "cfg2");
    assert!(appears(&server, "v1", "ConfigMap", Some("shoal-web"), "cfg2").await);
    assert_eq!(
        patches(&server.requests()),
        vec!["/api/v1/namespaces/shoal-web/configmaps/cfg2"]
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn objects_labelled_by_an_earlier_shoal_are_adopted_and_pruned() {
    let server = ApiServer::start().await;
    server.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shoal-web"}}));
    server.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "old", "namespace": "shoal-web",
                     "labels": {"app.kubernetes.io/managed-by": "shoal", "shoal.dev/app": "web"}}}));
    server.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "someone-elses", "namespace": "shoal-web"}}));
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app("web", "v1", None, manifests(&[CFG]))]);
    until_state(&rt, "web", WorkloadState::Running).await;
    assert!(vanishes(&server, "v1", "ConfigMap", Some("shoal-web"), "old").await);
    assert!(
        server
            .get("v1", "ConfigMap", Some("shoal-web"), "someone-elses")
            .is_some()
    );
    // The namespace was there before: never deleted, though an earlier Shoal may have labelled it.
    rt.reconcile(&[]);
    until(&rt, Duration::from_secs(10), |s| s.is_empty()).await;
    assert!(
        server
            .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
            .is_none()
    );
    assert!(server.get("v1", "Namespace", None, "shoal-web").is_some());
    rt.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_inventory_is_refused_by_name() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inventory.json"), b"not json").unwrap();
    let e = Kube::new(client(&server.url()), dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("inventory.json is corrupt"), "{e}");
}

#[tokio::test]
async fn non_kube_apps_are_refused() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let mut w = app("web", "v1", None, manifests(&[CFG]));
    w.spec.runtime = RuntimeKind::Native;
    rt.reconcile(&[w]);
    let r = until_state(&rt, "web", WorkloadState::Failed).await;
    assert!(r.reason.unwrap().contains("runs natively"));
    assert!(patches(&server.requests()).is_empty());
    rt.shutdown().await;
}

#[tokio::test]
async fn drift_no_watch_reports_is_repaired_by_the_periodic_reapply() {
    let server = ApiServer::start().await;
    // No list or watch of ConfigMaps allowed: drift can only be found by
    // re-applying.
    server.refuse(
        "GET",
        "/api/v1/namespaces/shoal-web/configmaps$",
        403,
        "Forbidden",
        "configmaps is forbidden: User \"edge\" cannot list resource \"configmaps\"",
    );
    let dir = tempfile::tempdir().unwrap();
    let timing = Timing {
        reapply: Duration::from_secs(1),
        resync: Duration::from_secs(2),
        ..Timing::default()
    };
    let mut rt = Kube::with_timing(client(&server.url()), dir.path(), timing).unwrap();
    rt.reconcile(&[app("web", "v1", None, manifests(&[CFG]))]);
    until_state(&rt, "web", WorkloadState::Running).await;
    server.delete_by_hand("v1", "ConfigMap", Some("shoal-web"), "cfg");
    // Rounds come every `resync` (10 s) at the latest; the first one past
    // `reapply` re-applies everything.
    assert!(
        kubetest::eventually(Duration::from_secs(15), || server
            .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
            .is_some())
        .await
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn an_api_server_that_never_answers_makes_workloads_unknown() {
    // Accepts connections and never answers (a blackholed link).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            held.push(c);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let timing = Timing {
        call: Duration::from_millis(500),
        ..Timing::default()
    };
    let mut rt = Kube::with_timing(client(&url), dir.path(), timing).unwrap();
    rt.reconcile(&[app("web", "v1", None, manifests(&[CFG]))]);
    let r = until_state(&rt, "web", WorkloadState::Unknown).await;
    let why = r.reason.unwrap();
    assert!(
        why.contains("no answer within 500ms") && why.contains("last known: nothing yet"),
        "{why}"
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn an_object_someone_else_made_is_neither_taken_over_nor_deleted() {
    let server = ApiServer::start().await;
    server
        .put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "plant-floor"}}));
    server.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "cfg", "namespace": "plant-floor"}, "data": {"k": "theirs"}}));
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app(
        "web",
        "v1",
        Some("plant-floor"),
        manifests(&[CFG, CFG2]),
    )]);
    let r = until_state(&rt, "web", WorkloadState::Failed).await;
    assert_eq!(
        r.reason.as_deref().unwrap(),
        "ConfigMap cfg exists and is not Shoal's: Shoal does not take over what it did not \
         create; delete or rename it"
    );
    let theirs = server
        .get("v1", "ConfigMap", Some("plant-floor"), "cfg")
        .unwrap();
    assert_eq!(theirs["data"]["k"], "theirs");
    assert!(
        !patches(&server.requests())
            .contains(&"/api/v1/namespaces/plant-floor/configmaps/cfg".to_string())
    );
    // The app leaves: what it made goes, theirs stays.
    rt.reconcile(&[]);
    assert!(vanishes(&server, "v1", "ConfigMap", Some("plant-floor"), "cfg2").await);
    until(&rt, Duration::from_secs(10), |s| s.is_empty()).await;
    assert_eq!(
        server
            .get("v1", "ConfigMap", Some("plant-floor"), "cfg")
            .unwrap()["data"]["k"],
        "theirs"
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn one_object_in_two_apps_fails_the_second() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let a = app("a", "v1", Some("shared"), manifests(&[CFG]));
    rt.reconcile(std::slice::from_ref(&a));
    until_state(&rt, "a", WorkloadState::Running).await;
    rt.reconcile(&[
        a.clone(),
        app("b", "v1", Some("shared"), manifests(&[CFG, CFG2])),
    ]);
    let r = until_state(&rt, "b", WorkloadState::Failed).await;
    assert_eq!(
        r.reason.as_deref().unwrap(),
        "manifest 1: ConfigMap cfg already belongs to app a"
    );
    assert_eq!(rt.status()["a"].state, WorkloadState::Running);
    // b leaving takes nothing of a's.
    rt.reconcile(std::slice::from_ref(&a));
    until(&rt, Duration::from_secs(10), |s| !s.contains_key("b")).await;
    assert!(
        server
            .get("v1", "ConfigMap", Some("shared"), "cfg")
            .is_some()
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_writer_that_keeps_changing_an_object_is_not_fought_in_a_tight_loop() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app("web", "v1", None, manifests(&[CFG]))]);
    until_state(&rt, "web", WorkloadState::Running).await;
    assert!(kubetest::eventually(Duration::from_secs(10), || watching(&server)).await);
    let tampered = |server: &ApiServer| {
        server
            .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
            .is_some_and(|o| o["data"]["k"] == "tampered")
    };
    // Three repairs at once...
    for _ in 0..3 {
        server.edit_by_hand("v1", "ConfigMap", Some("shoal-web"), "cfg", |o| {
            o["data"]["k"] = json!("tampered");
        });
        assert!(kubetest::eventually(Duration::from_secs(10), || !tampered(&server)).await);
    }
    // ... then they are spaced out, and the report says who keeps changing it.
    server.edit_by_hand("v1", "ConfigMap", Some("shoal-web"), "cfg", |o| {
        o["data"]["k"] = json!("tampered");
    });
    let s = until(&rt, Duration::from_secs(10), |s| {
        s["web"]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("ConfigMap cfg keeps being changed by kubectl-edit"))
    })
    .await;
    assert!(
        s["web"]
            .reason
            .as_deref()
            .unwrap()
            .contains("repairs are spaced out"),
        "{s:?}"
    );
    assert!(kubetest::eventually(Duration::from_secs(10), || !tampered(&server)).await);
    rt.shutdown().await;
}

#[tokio::test]
async fn a_crd_shipped_with_its_resources_is_applied_first() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let cactus = "apiVersion: botany.example.com/v1\nkind: Cactus\nmetadata: {name: saguaro}\nspec: {spines: 1000}\n";
    let mut w = app("garden", "v1", None, format!("{cactus}---\n{CRD}"));
    w.spec.kube.as_mut().unwrap().allow_cluster_scoped = true;
    rt.reconcile(&[w]);
    let s = until(&rt, Duration::from_secs(10), |s| {
        s.get("garden")
            .and_then(|r| r.reason.as_deref())
            .is_some_and(|r| r.contains("waiting for the cluster to serve Cactus"))
    })
    .await;
    assert_eq!(s["garden"].state, WorkloadState::Pending, "{s:?}");
    assert!(
        server
            .get(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                None,
                "cacti.botany.example.com"
            )
            .is_some()
    );
    // The API server establishes the CRD (the stand-in needs telling).
    server.add_crd("botany.example.com", "v1", "Cactus", "cacti", true);
    kubetest::until_state(
        &rt,
        "garden",
        WorkloadState::Running,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        server
            .get(
                "botany.example.com/v1",
                "Cactus",
                Some("shoal-garden"),
                "saguaro"
            )
            .is_some()
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_failing_api_server_makes_workloads_unknown_with_stable_words() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let timing = Timing {
        resync: Duration::from_millis(300),
        ..Timing::default()
    };
    let mut rt = Kube::with_timing(client(&server.url()), dir.path(), timing).unwrap();
    rt.reconcile(&[app("web", "v1", None, manifests(&[CFG]))]);
    until_state(&rt, "web", WorkloadState::Running).await;
    for method in ["GET", "PATCH", "POST", "DELETE"] {
        server.refuse(method, "/", 503, "ServiceUnavailable", "etcd is restarting");
    }
    rt.reconcile(&[app("web", "v1", None, manifests(&[CFG2]))]);
    let r = until_state(&rt, "web", WorkloadState::Unknown).await;
    let why = r.reason.clone().unwrap();
    assert!(
        why.contains("etcd is restarting") && why.contains("last known: running v1"),
        "{why}"
    );
    // Rounds come at least every 300 ms: over 2 s several pass, and the
    // words (which go into the node's document) stay the same.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        assert_eq!(rt.status()["web"].reason.as_deref(), Some(why.as_str()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.allow_all();
    let r = until_state(&rt, "web", WorkloadState::Running).await;
    assert_eq!(r.reason, None);
    assert!(vanishes(&server, "v1", "ConfigMap", Some("shoal-web"), "cfg").await);
    rt.shutdown().await;
}

#[tokio::test]
async fn nothing_is_removed_before_the_first_desired_state_arrives() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let w = app("web", "v1", None, manifests(&[CFG]));
    rt.reconcile(std::slice::from_ref(&w));
    until_state(&rt, "web", WorkloadState::Running).await;
    rt.shutdown().await;
    drop(rt);
    server.clear_requests();
    // A restarted node whose daemon takes its time before saying what is
    // desired. A round on an empty desired state would start the moment
    // the runtime's task runs: 300 ms is ample for its DELETEs to show.
    let mut rt = runtime(&server, dir.path());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        deletes(&server.requests()).is_empty(),
        "{:?}",
        server.requests()
    );
    rt.reconcile(std::slice::from_ref(&w));
    until_state(&rt, "web", WorkloadState::Running).await;
    assert!(deletes(&server.requests()).is_empty());
    assert!(
        server
            .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
            .is_some()
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn an_object_replaced_while_the_node_was_down_is_not_taken_over() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app("web", "v1", None, manifests(&[CFG]))]);
    until_state(&rt, "web", WorkloadState::Running).await;
    rt.shutdown().await;
    drop(rt);
    // While the node is down, someone replaces cfg with their own.
    server.delete_by_hand("v1", "ConfigMap", Some("shoal-web"), "cfg");
    server.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "cfg", "namespace": "shoal-web"}, "data": {"k": "theirs"}}));
    // The node comes back with a changed spec for cfg.
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app(
        "web",
        "v2",
        None,
        manifests(&[CFG]).replace("k: v", "k: v2"),
    )]);
    let s = until(&rt, Duration::from_secs(10), |s| {
        s.get("web")
            .and_then(|r| r.reason.as_deref())
            .is_some_and(|r| r.contains("ConfigMap cfg exists and is not Shoal's"))
    })
    .await;
    assert_eq!(s["web"].state, WorkloadState::Failed, "{s:?}");
    let theirs = server
        .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
        .unwrap();
    assert_eq!(theirs["data"]["k"], "theirs");
    rt.shutdown().await;
}

#[tokio::test]
async fn an_object_whose_labels_were_taken_off_is_still_shoals() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[app("web", "v1", None, manifests(&[CFG]))]);
    until_state(&rt, "web", WorkloadState::Running).await;
    assert!(kubetest::eventually(Duration::from_secs(10), || watching(&server)).await);
    let uid = server
        .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
        .unwrap()["metadata"]["uid"]
        .clone();
    server.edit_by_hand("v1", "ConfigMap", Some("shoal-web"), "cfg", |o| {
        o["metadata"]["labels"] = json!({"tier": "edge"});
    });
    // Same object (its UID): Shoal's labels are put back, nothing fails.
    assert!(
        kubetest::eventually(Duration::from_secs(10), || server
            .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
            .is_some_and(|o| o["metadata"]["labels"]["shoal.dev/app"] == "web"))
        .await
    );
    let cfg = server
        .get("v1", "ConfigMap", Some("shoal-web"), "cfg")
        .unwrap();
    assert_eq!(cfg["metadata"]["uid"], uid);
    assert_eq!(rt.status()["web"].state, WorkloadState::Running);
    // And it is still deleted with the app.
    rt.reconcile(&[]);
    assert!(vanishes(&server, "v1", "ConfigMap", Some("shoal-web"), "cfg").await);
    rt.shutdown().await;
}

#[tokio::test]
async fn a_crd_with_objects_of_others_is_not_deleted() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let mut w = app("garden", "v1", None, CRD.into());
    w.spec.kube.as_mut().unwrap().allow_cluster_scoped = true;
    rt.reconcile(&[w]);
    until_state(&rt, "garden", WorkloadState::Running).await;
    server.add_crd("botany.example.com", "v1", "Cactus", "cacti", true);
    // Someone else's cactus.
    server.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "theirs"}}));
    server.put(json!({"apiVersion": "botany.example.com/v1", "kind": "Cactus",
                      "metadata": {"name": "prickly", "namespace": "theirs"}, "spec": {"spines": 3}}));
    rt.reconcile(&[]);
    let s = until(&rt, Duration::from_secs(10), |s| {
        s.get("garden")
            .and_then(|r| r.reason.as_deref())
            .is_some_and(|r| r.contains("Cactus objects that are not this app's still exist"))
    })
    .await;
    assert_eq!(s["garden"].state, WorkloadState::Stopped, "{s:?}");
    assert!(
        server
            .get(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                None,
                "cacti.botany.example.com"
            )
            .is_some()
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_failing_webhook_fails_the_app_not_the_server() {
    let server = ApiServer::start().await;
    server.refuse(
        "PATCH",
        "/configmaps/cfg2",
        500,
        "InternalError",
        "Internal error occurred: failed calling webhook \"validate.example.com\": connection refused",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    rt.reconcile(&[
        app("a", "v1", Some("a"), manifests(&[CFG2])),
        app("b", "v1", Some("b"), manifests(&[CFG])),
    ]);
    let r = until_state(&rt, "a", WorkloadState::Failed).await;
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("failed calling webhook"),
        "{r:?}"
    );
    until_state(&rt, "b", WorkloadState::Running).await;
    rt.shutdown().await;
}

/// An app's artifacts reach its pods: each whole blob as a read-only
/// hostPath file at `/shoal/artifacts/<name>` with `SHOAL_ARTIFACT_<NAME>`;
/// a new version of the artifact (a new blob) changes the pod template, so
/// the Deployment rolls.
#[tokio::test]
async fn artifacts_are_mounted_read_only_into_the_pods() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let with = |blob: &str| {
        let mut w = app("web", "v1", None, manifests(&[DEPLOY]));
        w.artifacts
            .insert("model".into(), format!("/var/lib/shoal/blobs/{blob}"));
        w
    };
    rt.reconcile(&[with("aa11")]);
    until_state(&rt, "web", WorkloadState::Pending).await;
    let pod = |server: &ApiServer| {
        server
            .get("apps/v1", "Deployment", Some("shoal-web"), "web")
            .unwrap()["spec"]["template"]["spec"]
            .clone()
    };
    let spec = pod(&server);
    assert_eq!(
        spec["volumes"][0],
        json!({"name": "shoal-artifact-model", "hostPath": {"path": "/var/lib/shoal/blobs/aa11", "type": "File"}})
    );
    let c = &spec["containers"][0];
    assert_eq!(
        c["volumeMounts"][0],
        json!({"name": "shoal-artifact-model", "mountPath": "/shoal/artifacts/model", "readOnly": true})
    );
    assert_eq!(
        c["env"][0],
        json!({"name": "SHOAL_ARTIFACT_MODEL", "value": "/shoal/artifacts/model"})
    );
    complete(&server, "shoal-web", "web");
    until_state(&rt, "web", WorkloadState::Running).await;
    server.clear_requests();
    rt.reconcile(&[with("bb22")]);
    let seen = until_patched(&server, "deployments/web").await;
    assert!(seen, "the new blob was not applied");
    assert_eq!(
        pod(&server)["volumes"][0]["hostPath"]["path"],
        "/var/lib/shoal/blobs/bb22"
    );
    rt.shutdown().await;
}

/// A kube app's pods reach the site API with the app's own token: the
/// token is in a Secret of Shoal's (labelled, recorded, pruned with the
/// app), never in the Deployment, which refers to it; `SHOAL_SITE_API`
/// names the pod's host IP; a new token changes the Secret and rolls the
/// pods; a Secret of the app's own by that name is refused by name.
#[tokio::test]
async fn kube_apps_get_the_site_api_and_their_token_from_a_secret() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&server, dir.path());
    let token = "web.0123456789abcdef";
    let web = |token: &str| with_site_api(app("web", "v1", None, manifests(&[DEPLOY])), token);
    rt.reconcile(&[web(token)]);
    until_state(&rt, "web", WorkloadState::Pending).await;
    let secret = server
        .get("v1", "Secret", Some("shoal-web"), "shoal-web-token")
        .expect("the token's Secret");
    // base64 of the token.
    assert_eq!(secret["data"]["token"], "d2ViLjAxMjM0NTY3ODlhYmNkZWY=");
    assert_eq!(secret["metadata"]["labels"]["shoal.dev/app"], "web");
    let d = server
        .get("apps/v1", "Deployment", Some("shoal-web"), "web")
        .unwrap();
    assert!(
        !d.to_string().contains(token),
        "the token is in the Deployment: {d}"
    );
    let env = &d["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(
        env,
        &json!([
            {"name": "SHOAL_NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            {"name": "SHOAL_SITE_API", "value": "http://$(SHOAL_NODE_IP):8700"},
            {"name": "SHOAL_APP_TOKEN",
             "valueFrom": {"secretKeyRef": {"name": "shoal-web-token", "key": "token"}}},
        ])
    );
    let digest = |d: &serde_json::Value| {
        d["spec"]["template"]["metadata"]["annotations"]["shoal.dev/app-token-sha256"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let first = digest(&d);
    // A new app key: a new token, the Secret rewritten, the pods rolled.
    server.clear_requests();
    rt.reconcile(&[web("web.fedcba9876543210")]);
    assert!(until_patched(&server, "secrets/shoal-web-token").await);
    assert!(until_patched(&server, "deployments/web").await);
    let d = server
        .get("apps/v1", "Deployment", Some("shoal-web"), "web")
        .unwrap();
    assert_ne!(digest(&d), first);
    // The app leaves: its Secret goes with its other objects.
    rt.reconcile(&[]);
    assert!(
        vanishes(
            &server,
            "v1",
            "Secret",
            Some("shoal-web"),
            "shoal-web-token"
        )
        .await,
        "the token's Secret outlived its app"
    );
    assert!(
        deletes(&server.requests())
            .iter()
            .any(|p| p.ends_with("secrets/shoal-web-token")),
        "the Secret was not deleted by name"
    );
    // An app shipping a Secret of that name is refused, naming it.
    let own = "apiVersion: v1\nkind: Secret\nmetadata: {name: shoal-cam-token}\ndata: {}\n";
    rt.reconcile(&[with_site_api(app("cam", "v1", None, own.into()), token)]);
    let r = until_state(&rt, "cam", WorkloadState::Failed).await;
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("manifest 1: Secret shoal-cam-token is the name of the Secret Shoal"),
        "{r:?}"
    );
    rt.shutdown().await;
}

async fn until_patched(server: &ApiServer, path: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if patches(&server.requests())
            .iter()
            .any(|p| p.ends_with(path))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
