//! What the kube runtime's tests share, against the stand-in API server
//! (`kube_wire.rs`) and against a real cluster (`kube_real.rs`): apps to
//! apply and waits with deadlines on the runtime's reports.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crdt_state::fleet::model::{AppSpec, KubeSpec, RuntimeKind, WorkloadReport, WorkloadState};
use crdt_state::fleet::placement::Workload;
use node::runtime::Runtime;
use node::runtime::kube::Kube;

pub const DEPLOY: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx:IMAGE}]}\n";
pub const CFG: &str =
    "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, labels: {tier: edge}}\ndata: {k: v}\n";
pub const CFG2: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg2}\ndata: {k: v}\n";
pub const HPA_V1: &str = "apiVersion: autoscaling/v1\nkind: HorizontalPodAutoscaler\nmetadata: {name: web}\nspec: {scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}, minReplicas: 1, maxReplicas: 3}\n";
pub const HPA_V2: &str = "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: web}\nspec: {scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}, minReplicas: 1, maxReplicas: 4}\n";
pub const CLASS: &str = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: NAME}\nspec: {controller: example.com/edge}\n";

/// Manifests joined with `---`, the Deployment's image tag 1.27.
pub fn manifests(parts: &[&str]) -> String {
    parts.join("---\n").replace("IMAGE", "1.27")
}

/// A kube app.
pub fn app(name: &str, version: &str, ns: Option<&str>, manifests: String) -> Workload {
    Workload {
        app: name.into(),
        spec: AppSpec {
            runtime: RuntimeKind::Kube,
            version: Some(version.into()),
            kube: Some(KubeSpec {
                namespace: ns.map(String::from),
                manifests,
                allow_cluster_scoped: false,
            }),
            ..AppSpec::default()
        },
        files: Default::default(),
        artifacts: Default::default(),
        site_api: None,
        revision: String::new(),
    }
}

/// `w` as a node with a site API on a wildcard address hands it over.
pub fn with_site_api(mut w: Workload, token: &str) -> Workload {
    w.site_api = Some(crdt_state::fleet::placement::SiteApi {
        url: "http://$(SHOAL_NODE_IP):8700".into(),
        token: token.into(),
        ca_pem: None,
    });
    w
}

/// Waits up to `within` for `cond` on the runtime's reports; returns the last seen.
pub async fn until(
    rt: &Kube,
    within: Duration,
    cond: impl Fn(&BTreeMap<String, WorkloadReport>) -> bool,
) -> BTreeMap<String, WorkloadReport> {
    let deadline = Instant::now() + within;
    loop {
        let s = rt.status();
        if cond(&s) || Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `within` for `app` to be in `state`; fails the test if not.
pub async fn until_state(
    rt: &Kube,
    app: &str,
    state: WorkloadState,
    within: Duration,
) -> WorkloadReport {
    let s = until(rt, within, |s| s.get(app).is_some_and(|r| r.state == state)).await;
    let r = s.get(app).cloned();
    assert_eq!(r.as_ref().map(|r| r.state), Some(state), "{s:?}");
    r.expect("checked above")
}

/// Waits up to `within` for `cond`, polling every 20 ms.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
