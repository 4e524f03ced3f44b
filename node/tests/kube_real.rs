//! The kube runtime against a real Kubernetes API server, named by
//! `SHOAL_IT_KUBECONFIG` (a kubeconfig with cluster-admin rights, used to
//! set the scene and as the node's credentials):
//!
//! ```sh
//! SHOAL_IT_KUBECONFIG=/etc/rancher/k3s/k3s.yaml cargo test -p node --test kube_real -- --ignored --test-threads 1
//! ```
//!
//! Every test fails (it does not pass) without that variable. None needs a
//! kubelet: pods never have to become Ready, except in
//! `real_cluster_pods_become_ready`, which says so and skips with a message
//! when the cluster has no schedulable node. Each test works in namespaces
//! with a random suffix and deletes them at the end. The API server "going
//! down" is a TCP proxy between the runtime and the real server that the
//! test cuts and restores, so the real server never stops.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/kubetest.rs"]
mod kubetest;
#[path = "support/poll.rs"]
mod poll;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crdt_state::fleet::model::WorkloadState;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kubetest::{CFG, CFG2, CLASS, DEPLOY, HPA_V1, HPA_V2, app, manifests, until, with_site_api};
use node::runtime::Runtime;
use node::runtime::kube::Kube;
use poll::poll;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(60);

fn kubeconfig() -> std::path::PathBuf {
    std::env::var_os("SHOAL_IT_KUBECONFIG")
        .map(std::path::PathBuf::from)
        .expect("SHOAL_IT_KUBECONFIG must name the kubeconfig of a real cluster for this test")
}

async fn config() -> kube::Config {
    node::runtime::kube::install_crypto();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig()).unwrap();
    let mut c =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    node::runtime::kube::prepare(&mut c);
    c
}

async fn admin() -> kube::Client {
    kube::Client::try_from(config().await).unwrap()
}

fn suffix() -> String {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

fn resource(api_version: &str, kind: &str) -> ApiResource {
    let (g, v) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = match kind {
        "Namespace" => "namespaces",
        "ConfigMap" => "configmaps",
        "Deployment" => "deployments",
        "HorizontalPodAutoscaler" => "horizontalpodautoscalers",
        "IngressClass" => "ingressclasses",
        "CustomResourceDefinition" => "customresourcedefinitions",
        "ServiceAccount" => "serviceaccounts",
        "RoleBinding" => "rolebindings",
        "Node" => "nodes",
        "Secret" => "secrets",
        other => panic!("no plural for {other} in this test"),
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, kind), plural)
}

fn api(c: &kube::Client, api_version: &str, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
    let ar = resource(api_version, kind);
    match ns {
        Some(ns) => Api::namespaced_with(c.clone(), ns, &ar),
        None => Api::all_with(c.clone(), &ar),
    }
}

async fn get(
    c: &kube::Client,
    api_version: &str,
    kind: &str,
    ns: Option<&str>,
    name: &str,
) -> Option<Value> {
    api(c, api_version, kind, ns)
        .get_opt(name)
        .await
        .unwrap()
        .map(|o| serde_json::to_value(o).unwrap())
}

/// Creates or updates an object as someone other than Shoal.
async fn put(c: &kube::Client, obj: Value) {
    let api_version = obj["apiVersion"].as_str().unwrap().to_string();
    let kind = obj["kind"].as_str().unwrap().to_string();
    let ns = obj["metadata"]["namespace"].as_str().map(String::from);
    let name = obj["metadata"]["name"].as_str().unwrap().to_string();
    api(c, &api_version, &kind, ns.as_deref())
        .patch(
            &name,
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap();
}

async fn gone(
    c: &kube::Client,
    api_version: &str,
    kind: &str,
    ns: Option<&str>,
    name: &str,
) -> bool {
    let deadline = Instant::now() + WITHIN;
    while Instant::now() < deadline {
        match api(c, api_version, kind, ns).get_opt(name).await.unwrap() {
            None => return true,
            // A namespace goes through Terminating first.
            Some(o) if o.metadata.deletion_timestamp.is_some() => return true,
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    false
}

async fn cleanup(c: &kube::Client, namespaces: &[&str]) {
    for ns in namespaces {
        let _ = api(c, "v1", "Namespace", None)
            .delete(ns, &DeleteParams::default())
            .await;
    }
}

/// A TCP proxy in front of the real API server, to cut the node off it.
struct Proxy {
    port: u16,
    upstream: String,
    cut: Arc<Mutex<Option<tokio::sync::watch::Sender<bool>>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let p = Proxy {
            port,
            upstream,
            cut: Arc::default(),
        };
        p.serve(l);
        p
    }

    fn serve(&self, l: tokio::net::TcpListener) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        *self.cut.lock().unwrap() = Some(tx);
        let upstream = self.upstream.clone();
        tokio::spawn(async move {
            let mut stop = rx.clone();
            loop {
                let (mut inbound, _) = tokio::select! {
                    a = l.accept() => a.unwrap(),
                    _ = stop.changed() => return,
                };
                let upstream = upstream.clone();
                let mut stop = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut out) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        });
    }

    /// Closes the listener and every connection through it.
    fn cut(&self) {
        if let Some(tx) = self.cut.lock().unwrap().take() {
            let _ = tx.send(true);
        }
    }

    async fn restore(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => return self.serve(l),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding the proxy: {e}"),
            }
        }
    }
}

/// A client for the node that goes through `proxy`.
async fn through(proxy: &Proxy) -> kube::Client {
    let mut c = config().await;
    let host = c.cluster_url.host().unwrap().to_string();
    let scheme = c.cluster_url.scheme_str().unwrap_or("https").to_string();
    c.tls_server_name = Some(host);
    c.cluster_url = format!("{scheme}://127.0.0.1:{}", proxy.port)
        .parse()
        .unwrap();
    kube::Client::try_from(c).unwrap()
}

async fn upstream() -> String {
    let c = config().await;
    let host = c.cluster_url.host().unwrap().to_string();
    let port = c
        .cluster_url
        .port_u16()
        .unwrap_or(if c.cluster_url.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    format!("{host}:{port}")
}

fn node_runtime(client: kube::Client, dir: &std::path::Path) -> Kube {
    Kube::new(client, dir).unwrap()
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_a_namespace_it_found_survives_with_its_objects() {
    let c = admin().await;
    let ns = format!("plant-floor-{}", suffix());
    put(
        &c,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    put(
        &c,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "theirs", "namespace": ns}, "data": {"a": "b"}}),
    )
    .await;
    put(&c, json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "their-app", "namespace": ns},
                   "spec": {"replicas": 0, "selector": {"matchLabels": {"x": "y"}},
                            "template": {"metadata": {"labels": {"x": "y"}},
                                         "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})).await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    let a = app("a", "v1", Some(&ns), manifests(&[CFG]));
    let b = app("b", "v1", Some(&ns), manifests(&[CFG2]));
    rt.reconcile(&[a, b.clone()]);
    kubetest::until_state(&rt, "a", WorkloadState::Running, WITHIN).await;
    kubetest::until_state(&rt, "b", WorkloadState::Running, WITHIN).await;
    let nsobj = get(&c, "v1", "Namespace", None, &ns).await.unwrap();
    assert!(
        nsobj["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["manager"] != "shoal"),
        "Shoal wrote a namespace it found: {nsobj}"
    );
    rt.reconcile(&[b]);
    assert!(gone(&c, "v1", "ConfigMap", Some(&ns), "cfg").await);
    rt.reconcile(&[]);
    assert!(gone(&c, "v1", "ConfigMap", Some(&ns), "cfg2").await);
    until(&rt, WITHIN, |s| s.is_empty()).await;
    assert!(rt.status().is_empty(), "{:?}", rt.status());
    // Nothing of theirs went, and the namespace is not terminating.
    let nsobj = get(&c, "v1", "Namespace", None, &ns).await.unwrap();
    assert!(nsobj["metadata"]["deletionTimestamp"].is_null(), "{nsobj}");
    assert!(
        get(&c, "v1", "ConfigMap", Some(&ns), "theirs")
            .await
            .is_some()
    );
    assert!(
        get(&c, "apps/v1", "Deployment", Some(&ns), "their-app")
            .await
            .is_some()
    );
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_a_namespace_it_created_goes_with_its_last_app() {
    let c = admin().await;
    let ns = format!("shoal-made-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    rt.reconcile(&[app("a", "v1", Some(&ns), manifests(&[CFG]))]);
    kubetest::until_state(&rt, "a", WorkloadState::Running, WITHIN).await;
    let nsobj = get(&c, "v1", "Namespace", None, &ns).await.unwrap();
    assert_eq!(
        nsobj["metadata"]["annotations"]["shoal.dev/created-by"],
        "shoal"
    );
    rt.reconcile(&[]);
    assert!(gone(&c, "v1", "Namespace", None, &ns).await);
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_an_api_version_change_keeps_the_object() {
    let c = admin().await;
    let ns = format!("shoal-hpa-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    rt.reconcile(&[app("web", "v1", Some(&ns), HPA_V1.into())]);
    kubetest::until_state(&rt, "web", WorkloadState::Running, WITHIN).await;
    let before = get(
        &c,
        "autoscaling/v2",
        "HorizontalPodAutoscaler",
        Some(&ns),
        "web",
    )
    .await
    .unwrap();
    rt.reconcile(&[app("web", "v2", Some(&ns), HPA_V2.into())]);
    until(&rt, WITHIN, |s| s["web"].version.as_deref() == Some("v2")).await;
    // Past a few 10 s rounds, in which an exact-apiVersion prune would have struck.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let after = get(
        &c,
        "autoscaling/v2",
        "HorizontalPodAutoscaler",
        Some(&ns),
        "web",
    )
    .await
    .expect("the HPA was deleted");
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(after["spec"]["maxReplicas"], 4);
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_changes_made_while_the_api_server_is_down_converge() {
    let c = admin().await;
    let (ns, ns_gone) = (
        format!("shoal-web-{}", suffix()),
        format!("shoal-gone-{}", suffix()),
    );
    let proxy = Proxy::start(upstream().await).await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(through(&proxy).await, dir.path());
    let web = app("web", "v1", Some(&ns), manifests(&[CFG, CFG2]));
    let other = app("gone", "v1", Some(&ns_gone), manifests(&[CFG]));
    rt.reconcile(&[web, other]);
    kubetest::until_state(&rt, "web", WorkloadState::Running, WITHIN).await;
    kubetest::until_state(&rt, "gone", WorkloadState::Running, WITHIN).await;

    proxy.cut();
    let web2 = app("web", "v1", Some(&ns), manifests(&[CFG]));
    rt.reconcile(std::slice::from_ref(&web2));
    let s = until(&rt, WITHIN, |s| {
        s.get("web")
            .is_some_and(|r| r.state == WorkloadState::Unknown)
    })
    .await;
    assert_eq!(s["web"].state, WorkloadState::Unknown, "{s:?}");
    assert!(
        s["web"]
            .reason
            .as_deref()
            .unwrap()
            .contains("last known: running v1"),
        "{s:?}"
    );
    // The node restarts while cut off.
    rt.shutdown().await;
    drop(rt);
    proxy.restore().await;
    let mut rt = node_runtime(through(&proxy).await, dir.path());
    rt.reconcile(&[web2]);
    assert!(gone(&c, "v1", "ConfigMap", Some(&ns), "cfg2").await);
    assert!(gone(&c, "v1", "Namespace", None, &ns_gone).await);
    assert!(get(&c, "v1", "ConfigMap", Some(&ns), "cfg").await.is_some());
    kubetest::until_state(&rt, "web", WorkloadState::Running, WITHIN).await;
    rt.shutdown().await;
    cleanup(&c, &[&ns, &ns_gone]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_a_failed_apply_forgets_nothing() {
    let c = admin().await;
    let ns = format!("shoal-fail-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    let bad = DEPLOY.replace("replicas: 2", "replicas: -1");
    rt.reconcile(&[app("web", "v1", Some(&ns), format!("{CFG}---\n{bad}"))]);
    let r = kubetest::until_state(&rt, "web", WorkloadState::Failed, WITHIN).await;
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .starts_with("Deployment web: invalid:"),
        "{r:?}"
    );
    assert!(get(&c, "v1", "ConfigMap", Some(&ns), "cfg").await.is_some());
    // Someone else's object under a name the app uses next: never taken.
    put(
        &c,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "cfg2", "namespace": ns}, "data": {"k": "theirs"}}),
    )
    .await;
    // The node restarts: what it made is still known.
    rt.shutdown().await;
    drop(rt);
    let mut rt = node_runtime(c.clone(), dir.path());
    rt.reconcile(&[app("web", "v1", Some(&ns), manifests(&[CFG, CFG2]))]);
    let s = until(&rt, WITHIN, |s| {
        s["web"]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("ConfigMap cfg2 exists and is not Shoal's"))
    })
    .await;
    assert_eq!(s["web"].state, WorkloadState::Failed, "{s:?}");
    rt.reconcile(&[]);
    assert!(gone(&c, "v1", "ConfigMap", Some(&ns), "cfg").await);
    // Shoal created the namespace, so it goes — with cfg2 in it, which is
    // why the guide says to keep your own objects out of Shoal's namespaces.
    assert!(gone(&c, "v1", "Namespace", None, &ns).await);
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_crds_are_discovered_with_irregular_plurals() {
    let c = admin().await;
    let id = suffix();
    let group = format!("botany{id}.example.com");
    let ns = format!("shoal-garden-{id}");
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    let cactus = format!(
        "apiVersion: {group}/v1\nkind: Cactus\nmetadata: {{name: saguaro}}\nspec: {{spines: 1000}}\n"
    );
    rt.reconcile(&[app("garden", "v1", Some(&ns), cactus.clone())]);
    let r = kubetest::until_state(&rt, "garden", WorkloadState::Failed, WITHIN).await;
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("no matches for kind \"Cactus\"")
            && r.reason
                .as_deref()
                .unwrap()
                .contains("install its CRD first"),
        "{r:?}"
    );
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("cacti.{group}")},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "cacti", "singular": "cactus", "kind": "Cactus"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                                   "spec": {"type": "object", "properties": {"spines": {"type": "integer"}}}}}}}]}
    });
    put(&c, crd).await;
    kubetest::until_state(&rt, "garden", WorkloadState::Running, WITHIN).await;
    rt.reconcile(&[]);
    assert!(gone(&c, "v1", "Namespace", None, &ns).await);
    rt.shutdown().await;
    let _ = api(
        &c,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        None,
    )
    .delete(&format!("cacti.{group}"), &DeleteParams::default())
    .await;
    cleanup(&c, &[&ns]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_cluster_scoped_kinds_need_permission() {
    let c = admin().await;
    let name = format!("edge-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    let mut w = app("ingress", "v1", None, CLASS.replace("NAME", &name));
    rt.reconcile(std::slice::from_ref(&w));
    let r = kubetest::until_state(&rt, "ingress", WorkloadState::Failed, WITHIN).await;
    assert!(
        r.reason.as_deref().unwrap().contains("is cluster-scoped"),
        "{r:?}"
    );
    w.spec.kube.as_mut().unwrap().allow_cluster_scoped = true;
    rt.reconcile(&[w]);
    kubetest::until_state(&rt, "ingress", WorkloadState::Running, WITHIN).await;
    assert!(
        get(&c, "networking.k8s.io/v1", "IngressClass", None, &name)
            .await
            .is_some()
    );
    rt.reconcile(&[]);
    assert!(gone(&c, "networking.k8s.io/v1", "IngressClass", None, &name).await);
    rt.shutdown().await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_strict_validation_names_the_field() {
    let c = admin().await;
    let ns = format!("shoal-typo-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    let typo =
        manifests(&[DEPLOY]).replace("image: nginx:1.27", "image: nginx, imagePulPolicy: Always");
    rt.reconcile(&[app("web", "v1", Some(&ns), typo)]);
    let r = kubetest::until_state(&rt, "web", WorkloadState::Failed, WITHIN).await;
    let why = r.reason.unwrap();
    assert!(
        why.contains("imagePulPolicy") && why.contains("invalid"),
        "{why}"
    );
    // An object naming another namespace is refused, not moved.
    rt.reconcile(&[app(
        "web",
        "v1",
        Some(&ns),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shoal-test-c, namespace: kube-system}\n"
            .into(),
    )]);
    let s = until(&rt, WITHIN, |s| {
        s["web"]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("names namespace kube-system"))
    })
    .await;
    assert_eq!(s["web"].state, WorkloadState::Failed, "{s:?}");
    assert!(
        get(&c, "v1", "ConfigMap", Some("kube-system"), "shoal-test-c")
            .await
            .is_none()
    );
    rt.reconcile(&[]);
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_namespace_scoped_credentials_suffice() {
    let c = admin().await;
    let ns = format!("granted-{}", suffix());
    put(
        &c,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    put(
        &c,
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "edge", "namespace": ns}}),
    )
    .await;
    put(&c, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "edge", "namespace": ns},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
                   "subjects": [{"kind": "ServiceAccount", "name": "edge", "namespace": ns}]})).await;
    // A token for that service account (TokenRequest).
    let sa: Api<DynamicObject> = api(&c, "v1", "ServiceAccount", Some(&ns));
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                     "spec": {"expirationSeconds": 3600}});
    let token: Value = sa
        .create_subresource("token", "edge", &PostParams::default(), &req)
        .await
        .unwrap();
    let token = token["status"]["token"].as_str().unwrap().to_string();
    // The admin kubeconfig's cluster, with the service account's token.
    let kc = kube::config::Kubeconfig::read_from(kubeconfig()).unwrap();
    // The cluster of the kubeconfig's current context.
    let current = kc.current_context.clone().unwrap_or_default();
    let cluster_name = kc
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .unwrap_or_else(|| kc.clusters[0].name.clone());
    let cluster = kc.clusters.iter().find(|c| c.name == cluster_name).unwrap();
    let cluster = serde_json::to_value(cluster).unwrap();
    let edge_kc: kube::config::Kubeconfig = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "edge", "user": {"token": token}}],
        "contexts": [{"name": "edge", "context": {"cluster": cluster["name"], "user": "edge"}}],
        "current-context": "edge",
    }))
    .unwrap();
    let mut cfg =
        kube::Config::from_custom_kubeconfig(edge_kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    node::runtime::kube::prepare(&mut cfg);
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(kube::Client::try_from(cfg).unwrap(), dir.path());
    // With the token's Secret, which `edit` may write too.
    rt.reconcile(&[with_site_api(
        app("web", "v1", Some(&ns), manifests(&[CFG])),
        "web.00ff",
    )]);
    kubetest::until_state(&rt, "web", WorkloadState::Running, WITHIN).await;
    assert!(
        get(&c, "v1", "Secret", Some(&ns), "shoal-web-token")
            .await
            .is_some()
    );
    rt.reconcile(&[]);
    assert!(gone(&c, "v1", "ConfigMap", Some(&ns), "cfg").await);
    assert!(gone(&c, "v1", "Secret", Some(&ns), "shoal-web-token").await);
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_drift_is_repaired_within_10_s() {
    let c = admin().await;
    let ns = format!("shoal-drift-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    rt.reconcile(&[app("web", "v1", Some(&ns), manifests(&[CFG, CFG2]))]);
    kubetest::until_state(&rt, "web", WorkloadState::Running, WITHIN).await;
    // No wait for the watches: if the deletion comes before a watch's
    // first list, that list finds the object missing and repairs it too.
    let cms = api(&c, "v1", "ConfigMap", Some(&ns));
    let t = Instant::now();
    cms.delete("cfg", &DeleteParams::default()).await.unwrap();
    let mut back = false;
    while t.elapsed() < Duration::from_secs(10) {
        if cms.get_opt("cfg").await.unwrap().is_some() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "a deleted ConfigMap was not back within 10 s");
    eprintln!("deleted ConfigMap back after {:?}", t.elapsed());
    let t = Instant::now();
    cms.patch(
        "cfg2",
        &PatchParams {
            field_manager: Some("kubectl-edit".into()),
            ..PatchParams::default()
        },
        &Patch::Merge(json!({"data": {"k": "tampered"}})),
    )
    .await
    .unwrap();
    let mut restored = false;
    while t.elapsed() < Duration::from_secs(10) {
        let o = cms.get("cfg2").await.unwrap();
        if o.data["data"]["k"] == "v" {
            restored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(restored, "an edited field was not set back within 10 s");
    eprintln!("edited ConfigMap set back after {:?}", t.elapsed());
    rt.reconcile(&[]);
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_rollout_status_without_a_kubelet() {
    // Pods are created but never become available without a kubelet: the
    // report must say so, as kubectl rollout status does, and must not
    // claim the version runs.
    let c = admin().await;
    let ns = format!("shoal-roll-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    // A node selector no node matches: pods are created, never scheduled,
    // whether the cluster has nodes or not.
    let nowhere = manifests(&[DEPLOY]).replace(
        "spec: {containers:",
        "spec: {nodeSelector: {shoal.dev/nowhere: \"true\"}, containers:",
    );
    let zero = nowhere.replace("replicas: 2", "replicas: 0");
    rt.reconcile(&[app("web", "v1", Some(&ns), zero)]);
    let r = kubetest::until_state(&rt, "web", WorkloadState::Running, WITHIN).await;
    assert_eq!(r.version.as_deref(), Some("v1"));
    rt.reconcile(&[app("web", "v2", Some(&ns), nowhere)]);
    let s = until(&rt, WITHIN, |s| {
        s["web"]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("0 of 2 updated replicas are available"))
    })
    .await;
    let r = &s["web"];
    assert_eq!(r.state, WorkloadState::Pending, "{s:?}");
    assert_eq!(r.version.as_deref(), Some("v1"), "{s:?}");
    assert!(
        r.reason.as_deref().unwrap().contains("rolling out v2"),
        "{s:?}"
    );
    // A StatefulSet whose pod cannot be scheduled waits, as kubectl says;
    // a DaemonSet with no node to run on has nothing to wait for.
    let sts = "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec:\n  replicas: 1\n  serviceName: db\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n    spec: {nodeSelector: {shoal.dev/nowhere: \"true\"}, containers: [{name: db, image: busybox}]}\n";
    let ds = sts
        .replace("StatefulSet", "DaemonSet")
        .replace("  replicas: 1\n  serviceName: db\n", "")
        .replace("name: db", "name: agent")
        .replace("app: db", "app: agent");
    rt.reconcile(&[app("db", "v1", Some(&ns), format!("{sts}---\n{ds}"))]);
    let s = until(&rt, WITHIN, |s| {
        s.get("db")
            .and_then(|r| r.reason.as_deref())
            .is_some_and(|r| {
                r.contains("waiting for 1 pods to be ready") && !r.contains("DaemonSet")
            })
    })
    .await;
    assert_eq!(s["db"].state, WorkloadState::Pending, "{s:?}");
    assert!(
        !s["db"].reason.as_deref().unwrap().contains("DaemonSet"),
        "{s:?}"
    );
    rt.reconcile(&[]);
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_pods_become_ready() {
    // Needs a schedulable node that can pull nginx: skips with a message otherwise.
    let c = admin().await;
    if !schedulable(&c).await {
        eprintln!(
            "SKIPPED real_cluster_pods_become_ready: the cluster has no schedulable Ready node"
        );
        return;
    }
    let ns = format!("shoal-ready-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    rt.reconcile(&[app("web", "v1", Some(&ns), manifests(&[DEPLOY]))]);
    let r =
        kubetest::until_state(&rt, "web", WorkloadState::Running, Duration::from_secs(300)).await;
    assert_eq!(r.version.as_deref(), Some("v1"));
    rt.reconcile(&[app("web", "v2", Some(&ns), DEPLOY.replace("IMAGE", "1.28"))]);
    let s = until(&rt, Duration::from_secs(300), |s| {
        s["web"].state == WorkloadState::Running && s["web"].version.as_deref() == Some("v2")
    })
    .await;
    assert_eq!(s["web"].version.as_deref(), Some("v2"), "{s:?}");
    assert_eq!(s["web"].state, WorkloadState::Running, "{s:?}");
    rt.reconcile(&[]);
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

/// Does the cluster have a node that can run pods?
async fn schedulable(c: &kube::Client) -> bool {
    let nodes = api(c, "v1", "Node", None)
        .list(&Default::default())
        .await
        .unwrap();
    nodes.items.iter().any(|n| {
        n.data["spec"]["unschedulable"] != json!(true)
            && n.data["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    })
}

/// A kube app's site API and token as a real cluster takes them: the
/// Secret holds the token, the Deployment (validated strictly) refers to
/// it and to the host IP; and, where a pod can run, its container sees the
/// token and a URL with the host IP filled in. The Secret goes with the app.
#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_pods_get_the_site_api_and_their_token() {
    let c = admin().await;
    let ns = format!("shoal-token-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    let token = format!("web.{}", suffix());
    // Prints what it was given, then waits to be deleted.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: probe}\nspec:\n  restartPolicy: Never\n  containers: [{name: probe, image: busybox:1.36, command: [sh, -c, 'echo \"given $SHOAL_APP_TOKEN $SHOAL_SITE_API\"; sleep 3600']}]\n";
    rt.reconcile(&[with_site_api(
        app("web", "v1", Some(&ns), manifests(&[DEPLOY, pod])),
        &token,
    )]);
    let secret = poll(WITHIN, || {
        get(&c, "v1", "Secret", Some(&ns), "shoal-web-token")
    })
    .await
    .expect("the token's Secret");
    let stored: k8s_openapi::ByteString =
        serde_json::from_value(secret["data"]["token"].clone()).unwrap();
    assert_eq!(stored.0, token.as_bytes());
    let d = poll(WITHIN, || {
        get(&c, "apps/v1", "Deployment", Some(&ns), "web")
    })
    .await
    .expect("the Deployment");
    assert!(
        !d.to_string().contains(&token),
        "the token is in the Deployment"
    );
    let env = &d["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(
        env[2]["valueFrom"]["secretKeyRef"]["name"],
        "shoal-web-token"
    );
    if schedulable(&c).await {
        // The pulled image and a started container within 300 s.
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c.clone(), &ns);
        let line = poll(Duration::from_secs(300), || async {
            let log = pods.logs("probe", &Default::default()).await.ok()?;
            log.lines()
                .find(|l| l.starts_with("given "))
                .map(String::from)
        })
        .await
        .expect("the probe pod printed what it was given");
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[1], token, "{line}");
        assert!(
            words[2].starts_with("http://") && !words[2].contains("$("),
            "the host IP was not filled in: {line}"
        );
    } else {
        eprintln!("the cluster has no schedulable Ready node: the probe pod's env was not checked");
    }
    rt.reconcile(&[]);
    assert!(gone(&c, "v1", "Secret", Some(&ns), "shoal-web-token").await);
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_objects_an_earlier_shoal_labelled_are_adopted_and_pruned() {
    let c = admin().await;
    let ns = format!("shoal-old-{}", suffix());
    put(
        &c,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    put(&c, json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "old", "namespace": ns,
                                "labels": {"app.kubernetes.io/managed-by": "shoal", "shoal.dev/app": "web"}}})).await;
    put(
        &c,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "someone-elses", "namespace": ns}}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    rt.reconcile(&[app("web", "v1", Some(&ns), manifests(&[CFG]))]);
    kubetest::until_state(&rt, "web", WorkloadState::Running, WITHIN).await;
    assert!(gone(&c, "v1", "ConfigMap", Some(&ns), "old").await);
    assert!(
        get(&c, "v1", "ConfigMap", Some(&ns), "someone-elses")
            .await
            .is_some()
    );
    rt.reconcile(&[]);
    assert!(gone(&c, "v1", "ConfigMap", Some(&ns), "cfg").await);
    // Found, not made: the namespace stays.
    let nsobj = get(&c, "v1", "Namespace", None, &ns).await.unwrap();
    assert!(nsobj["metadata"]["deletionTimestamp"].is_null(), "{nsobj}");
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}

/// Artifacts as a real API server takes them: the Deployment's pods get
/// each blob as a read-only hostPath file and its variable (validated
/// strictly by the server), and a new blob rolls the template.
#[tokio::test]
#[ignore = "needs a real cluster: SHOAL_IT_KUBECONFIG=path cargo test -- --ignored"]
async fn real_cluster_artifacts_are_mounted_read_only() {
    let c = admin().await;
    let ns = format!("shoal-art-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let mut rt = node_runtime(c.clone(), dir.path());
    let with = |blob: &str| {
        let mut w = app("web", "v1", Some(&ns), manifests(&[DEPLOY]));
        w.artifacts
            .insert("model".into(), format!("/var/lib/shoal/blobs/{blob}"));
        w
    };
    rt.reconcile(&[with("aa11")]);
    let deployed = |blob: &'static str| {
        let c = c.clone();
        let ns = ns.clone();
        async move {
            poll(WITHIN, || async {
                let d = get(&c, "apps/v1", "Deployment", Some(&ns), "web").await?;
                let spec = &d["spec"]["template"]["spec"];
                (spec["volumes"][0]["hostPath"]["path"]
                    == format!("/var/lib/shoal/blobs/{blob}").as_str())
                .then(|| spec.clone())
            })
            .await
        }
    };
    let spec = deployed("aa11")
        .await
        .expect("the Deployment with its artifact");
    assert_eq!(spec["volumes"][0]["hostPath"]["type"], "File");
    let ct = &spec["containers"][0];
    assert_eq!(ct["volumeMounts"][0]["mountPath"], "/shoal/artifacts/model");
    assert_eq!(ct["volumeMounts"][0]["readOnly"], true);
    assert_eq!(ct["env"][0]["name"], "SHOAL_ARTIFACT_MODEL");
    rt.reconcile(&[with("bb22")]);
    assert!(
        deployed("bb22").await.is_some(),
        "the new blob rolls the template"
    );
    rt.reconcile(&[]);
    rt.shutdown().await;
    cleanup(&c, &[&ns]).await;
}
