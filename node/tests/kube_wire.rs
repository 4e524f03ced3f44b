//! The kube runtime at the wire. No Kubernetes API server can be installed
//! on these machines, so these tests run it against a canned HTTP server
//! (a stand-in, named as such) and check the exact requests it makes and
//! how it maps the answers: server-side apply with the `shoal` field
//! manager into a namespace Shoal owns, pruning by label, rollout status,
//! and 403/409/422/unreachable as failed workloads with their reason.
//!
//! `real_cluster_*` run against a real cluster named by
//! `SHOAL_IT_KUBECONFIG` (`cargo test -- --ignored`); they fail without it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use crdt_state::model::{AppSpec, KubeSpec, RuntimeKind, WorkloadState};
use crdt_state::placement::Workload;
use node::runtime::Runtime;
use node::runtime::kube::Kube;
use serde_json::{Value, json};

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

type Answer = Arc<dyn Fn(&str, &str, &Value) -> (u16, Value) + Send + Sync>;

/// A stand-in API server: records every request, answers with `answer`.
async fn fake_api(answer: Answer) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let log = log.clone();
        let answer = answer.clone();
        async move {
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let s = Seen {
                method: method.to_string(),
                path: uri.path().to_string(),
                query: uri.query().unwrap_or("").to_string(),
                content_type: headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
                body: body.clone(),
            };
            let (code, v) = answer(&s.method, &s.path, &body);
            log.lock().unwrap().push(s);
            (
                StatusCode::from_u16(code).unwrap(),
                [("content-type", "application/json")],
                v.to_string(),
            )
        }
    };
    let app = axum::Router::new().fallback(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn client(url: &str) -> kube::Client {
    node::runtime::kube::install_crypto();
    let config = kube::Config::new(url.parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

const MANIFESTS: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx}]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, labels: {tier: edge}}\ndata: {k: v}\n";

fn workload(manifests: &str) -> Workload {
    Workload {
        app: "web".into(),
        spec: AppSpec {
            runtime: RuntimeKind::Kube,
            version: Some("v3".into()),
            kube: Some(KubeSpec {
                namespace: None,
                manifests: manifests.into(),
            }),
            ..AppSpec::default()
        },
        files: Default::default(),
    }
}

/// Answers like an API server that accepts everything: an apply echoes
/// the object, lists hold `listed`, the Deployment has `available` of 2.
fn accepting(listed: Vec<Value>, available: i64) -> Answer {
    Arc::new(move |method, path, body| match method {
        "PATCH" => (200, body.clone()),
        "GET" if path.ends_with("/configmaps") || path.ends_with("/deployments") => {
            let items: Vec<Value> = listed
                .iter()
                .filter(|i| {
                    path.ends_with(&format!("{}s", i["kind"].as_str().unwrap().to_lowercase()))
                })
                .cloned()
                .collect();
            (
                200,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}),
            )
        }
        "GET" if path.ends_with("/deployments/web") => (
            200,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "web", "namespace": "shoal-web"},
                   "spec": {"replicas": 2},
                   "status": {"availableReplicas": available,
                              "conditions": [{"type": "Available", "status": if available < 2 {"False"} else {"True"},
                                              "message": "Deployment does not have minimum availability."}]}}),
        ),
        "DELETE" => (200, status(200, "", "deleted")),
        _ => (404, status(404, "NotFound", "no such path in the stand-in")),
    })
}

async fn settle(
    rt: &Kube,
    f: impl Fn(&WorkloadState) -> bool,
) -> Option<crdt_state::model::WorkloadReport> {
    for _ in 0..100 {
        if let Some(r) = rt.status().get("web")
            && f(&r.state)
        {
            return Some(r.clone());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rt.status().get("web").cloned()
}

#[tokio::test]
async fn applies_server_side_into_an_owned_namespace_and_reads_rollout() {
    let (url, shared) = fake_api(accepting(vec![], 1)).await;
    let mut rt = Kube::new(client(&url));
    rt.reconcile(&[workload(MANIFESTS)]);
    let r = settle(&rt, |s| {
        *s != WorkloadState::Failed && shared.lock().unwrap().len() >= 6
    })
    .await
    .unwrap();
    let seen = shared.lock().unwrap().clone();
    let patches: Vec<&Seen> = seen.iter().filter(|s| s.method == "PATCH").collect();
    assert_eq!(
        patches.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(),
        vec![
            "/api/v1/namespaces/shoal-web",
            "/apis/apps/v1/namespaces/shoal-web/deployments/web",
            "/api/v1/namespaces/shoal-web/configmaps/cfg",
        ]
    );
    for p in &patches {
        assert_eq!(p.content_type, "application/apply-patch+yaml");
        assert!(p.query.contains("fieldManager=shoal"), "{}", p.query);
        assert!(p.query.contains("force=true"), "{}", p.query);
        assert_eq!(
            p.body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "shoal"
        );
        assert_eq!(p.body["metadata"]["labels"]["shoal.dev/app"], "web");
    }
    assert_eq!(patches[1].body["metadata"]["namespace"], "shoal-web");
    // The app's own labels are kept beside Shoal's.
    assert_eq!(patches[2].body["metadata"]["labels"]["tier"], "edge");
    // Lists by label for pruning, then the Deployment's status.
    let lists: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method == "GET" && s.query.contains("labelSelector"))
        .collect();
    assert_eq!(lists.len(), 2);
    assert!(lists.iter().all(
        |l| l.query.contains("shoal.dev%2Fapp%3Dweb") || l.query.contains("shoal.dev/app=web")
    ));
    assert_eq!(r.state, WorkloadState::Pending);
    let reason = r.reason.unwrap();
    assert!(reason.contains("Deployment web 1/2 available"), "{reason}");
    assert_eq!(r.version.as_deref(), Some("v3"));
    // The same desired state again: status is read, nothing re-applied.
    let before = seen.len();
    rt.reconcile(&[workload(MANIFESTS)]);
    let mut again = Vec::new();
    for _ in 0..100 {
        again = shared.lock().unwrap()[before..].to_vec();
        if !again.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!again.is_empty(), "the status was not read again");
    assert!(again.iter().all(|s| s.method == "GET"), "{again:?}");
}

#[tokio::test]
async fn prunes_objects_that_left_the_manifests_and_reports_running() {
    // The cluster still holds a ConfigMap "old" of this app.
    let old = json!({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "old", "namespace": "shoal-web"}});
    let cfg = json!({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "cfg", "namespace": "shoal-web"}});
    let (url, seen) = fake_api(accepting(vec![old, cfg], 2)).await;
    let mut rt = Kube::new(client(&url));
    rt.reconcile(&[workload(MANIFESTS)]);
    let r = settle(&rt, |s| *s == WorkloadState::Running).await.unwrap();
    assert_eq!(r.state, WorkloadState::Running);
    let deletes: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(deletes, vec!["/api/v1/namespaces/shoal-web/configmaps/old"]);
}

async fn failed_with(answer: Answer) -> String {
    let (url, _) = fake_api(answer).await;
    let mut rt = Kube::new(client(&url));
    rt.reconcile(&[workload(MANIFESTS)]);
    let r = settle(&rt, |s| *s == WorkloadState::Failed).await.unwrap();
    assert_eq!(r.state, WorkloadState::Failed);
    r.reason.unwrap()
}

fn refusing(code: u16, reason: &'static str, message: &'static str) -> Answer {
    Arc::new(move |method, path, body| {
        if method == "PATCH" && path.contains("/deployments/") {
            (code, status(code, reason, message))
        } else if method == "PATCH" {
            (200, body.clone())
        } else {
            (404, status(404, "NotFound", "no"))
        }
    })
}

#[tokio::test]
async fn maps_api_errors_to_failed_workloads() {
    let r = failed_with(refusing(
        403,
        "Forbidden",
        "deployments.apps is forbidden: User \"edge\" cannot patch",
    ))
    .await;
    assert!(
        r.starts_with("Deployment web: forbidden: deployments.apps is forbidden"),
        "{r}"
    );
    let r = failed_with(refusing(409, "Conflict", "Apply failed with 1 conflict")).await;
    assert!(
        r.starts_with("Deployment web: conflict: Apply failed"),
        "{r}"
    );
    let r = failed_with(refusing(422, "Invalid", "spec.replicas: Invalid value: -1")).await;
    assert!(
        r.starts_with("Deployment web: invalid: spec.replicas"),
        "{r}"
    );
}

#[tokio::test]
async fn an_unreachable_api_server_and_bad_manifests_are_reported() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut rt = Kube::new(client(&format!("http://127.0.0.1:{port}")));
    rt.reconcile(&[workload(MANIFESTS)]);
    let r = settle(&rt, |s| *s == WorkloadState::Failed).await.unwrap();
    assert!(
        r.reason.as_deref().unwrap().contains("unreachable"),
        "{:?}",
        r.reason
    );

    let (url, seen) = fake_api(accepting(vec![], 2)).await;
    let mut rt = Kube::new(client(&url));
    rt.reconcile(&[workload(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: god}\n",
    )]);
    let r = settle(&rt, |s| *s == WorkloadState::Failed).await.unwrap();
    assert!(
        r.reason.as_deref().unwrap().contains("cluster-scoped"),
        "{:?}",
        r.reason
    );
    rt.reconcile(&[workload("kind: Deployment\nmetadata: {name: x}\n")]);
    let mut reason = String::new();
    for _ in 0..100 {
        reason = rt.status()["web"].reason.clone().unwrap_or_default();
        if reason.contains("missing apiVersion") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reason.contains("missing apiVersion"), "{reason}");
    // Nothing was applied for either.
    assert!(seen.lock().unwrap().iter().all(|s| s.method != "PATCH"));
}

fn real_client_config() -> std::path::PathBuf {
    std::env::var_os("SHOAL_IT_KUBECONFIG")
        .map(std::path::PathBuf::from)
        .expect("SHOAL_IT_KUBECONFIG must name the kubeconfig of a real cluster for this test")
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_apply_rollout_and_prune() {
    let path = real_client_config();
    let client = node::runtime::kube::client(Some(&path)).await.unwrap();
    let mut rt = Kube::new(client);
    rt.reconcile(&[workload(MANIFESTS)]);
    let mut running = false;
    for _ in 0..120 {
        if rt
            .status()
            .get("web")
            .is_some_and(|r| r.state == WorkloadState::Running)
        {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(running, "{:?}", rt.status());
    // Removed: its namespace goes.
    rt.reconcile(&[]);
    let mut gone = false;
    for _ in 0..60 {
        if rt.status().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(gone, "{:?}", rt.status());
}
