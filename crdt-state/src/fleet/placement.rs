//! Placement: which workloads a node runs. A pure function of the
//! documents; every node computes its own share and nobody assigns it.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::fleet::model::{AppSpec, FleetView, NodeSpec, RuntimeKind, SiteOverrideSpec};

/// One workload a node should run: the app with its site's overrides and
/// its config files resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// App name.
    pub app: String,
    /// The effective spec (site overrides applied).
    pub spec: AppSpec,
    /// Files to render: relative path → content.
    pub files: BTreeMap<String, String>,
    /// The artifacts it reads, once whole on this node: its own name for
    /// each → the path of the blob (set by the node, not by placement).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifacts: BTreeMap<String, String>,
    /// How the app reaches its node's site API, for a runtime that passes
    /// it on itself (the kube runtime, as a Secret); set by the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_api: Option<SiteApi>,
    /// The revision of the App spec it comes from (before the site's
    /// overrides): what the node reports and a rollout's gate counts.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
}

/// Where an app finds its node's site API, and the app's own token there.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct SiteApi {
    /// The URL as the app dials it. May name `$(SHOAL_NODE_IP)`, which the
    /// kube runtime sets from the pod's host IP.
    pub url: String,
    /// The app's token (`Authorization: Bearer …`).
    pub token: String,
    /// The site API's TLS certificate (PEM) for the app to trust, when it
    /// serves HTTPS (ADR 0014).
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for SiteApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteApi")
            .field("url", &self.url)
            .field("token", &"(hidden)")
            .finish()
    }
}

/// The labels a selector sees for a node: its own plus `site` and `node`.
pub fn node_labels(name: &str, node: &NodeSpec) -> BTreeMap<String, String> {
    let mut labels = node.labels.clone();
    labels.insert("site".into(), node.site.clone());
    labels.insert("node".into(), name.into());
    labels
}

fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One label of a node as a selector sees it (without building the map).
pub fn label<'a>(name: &'a str, node: &'a NodeSpec, key: &str) -> Option<&'a str> {
    match key {
        "site" => Some(node.site.as_str()),
        "node" => Some(name),
        k => node.labels.get(k).map(String::as_str),
    }
}

fn selects(selector: &BTreeMap<String, String>, name: &str, node: &NodeSpec) -> bool {
    selector
        .iter()
        .all(|(k, v)| label(name, node, k) == Some(v.as_str()))
}

/// Every node `spec` places app `app` on, counting every registered node
/// as healthy (as nodes do for their own share).
pub fn placed(fleet: &FleetView, app: &str, spec: &AppSpec) -> Vec<String> {
    let mut candidates: Vec<&String> = fleet
        .nodes
        .iter()
        .filter(|(n, s)| selects(&spec.selector, n, s))
        .map(|(n, _)| n)
        .collect();
    if let Some(r) = spec.replicas {
        let mut scored: Vec<(&String, [u8; 32])> =
            candidates.iter().map(|n| (*n, score(app, n))).collect();
        scored.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        candidates = scored
            .into_iter()
            .take(r as usize)
            .map(|(n, _)| n)
            .collect();
    }
    candidates.into_iter().cloned().collect()
}

/// Rendezvous score of `node` for `app`: the top `replicas` scores win.
fn score(app: &str, node: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(app.as_bytes());
    h.update([0]);
    h.update(node.as_bytes());
    h.finalize().into()
}

/// The workloads `node` should run. `healthy` says which nodes count for
/// replica spreading (all registered nodes when it always says yes). A
/// node that is not in the registry runs nothing.
pub fn share(
    fleet: &FleetView,
    site: Option<&SiteOverrideSpec>,
    node: &str,
    healthy: &dyn Fn(&str) -> bool,
) -> Vec<Workload> {
    share_with(fleet, site, node, healthy, &BTreeMap::new(), &mut |app| {
        crate::fleet::rollout::wave_of(fleet, app, node)
    })
}

/// [`share`] under rollouts: an app whose rollout has not reached this
/// node (its wave, `wave_of(app)`, is not open), was aborted, or was
/// rolled back here (`rolled_back`: app → the revision left) runs the spec
/// the rollout replaces.
pub fn share_with(
    fleet: &FleetView,
    site: Option<&SiteOverrideSpec>,
    node: &str,
    healthy: &dyn Fn(&str) -> bool,
    rolled_back: &BTreeMap<String, String>,
    wave_of: &mut dyn FnMut(&str) -> Option<usize>,
) -> Vec<Workload> {
    let Some(me) = fleet.nodes.get(node) else {
        return Vec::new();
    };
    let my_labels = node_labels(node, me);
    let choices = crate::fleet::rollout::choices(fleet, rolled_back, wave_of);
    let mut out = Vec::new();
    for (name, target) in &fleet.apps {
        let app = match choices.get(name) {
            Some(crate::fleet::rollout::Choice::From(spec)) => &**spec,
            _ => target,
        };
        if !matches(&app.selector, &my_labels) {
            continue;
        }
        if let Some(r) = app.replicas {
            let mut candidates: Vec<(&String, [u8; 32])> = fleet
                .nodes
                .iter()
                .filter(|(n, spec)| {
                    (n.as_str() == node || healthy(n))
                        && matches(&app.selector, &node_labels(n, spec))
                })
                .map(|(n, _)| (n, score(name, n)))
                .collect();
            candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            if !candidates
                .iter()
                .take(r as usize)
                .any(|(n, _)| n.as_str() == node)
            {
                continue;
            }
        }
        let over = site.and_then(|s| s.apps.get(name));
        if over.and_then(|o| o.paused) == Some(true) {
            continue;
        }
        let mut spec = app.clone();
        if let Some(o) = over {
            if let Some(v) = &o.version {
                spec.version = Some(v.clone());
            }
            if let Some(native) = spec.native.as_mut() {
                native
                    .env
                    .extend(o.env.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        let mut files = BTreeMap::new();
        if let (RuntimeKind::Native, Some(native)) = (spec.runtime, &spec.native) {
            for (path, src) in &native.files {
                let mut data = fleet
                    .configs
                    .get(&src.config)
                    .map(|c| c.data.clone())
                    .unwrap_or_default();
                if let Some(o) = site.and_then(|s| s.configs.get(&src.config)) {
                    data.extend(o.data.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                let content = match &src.key {
                    Some(k) => data.get(k).cloned().unwrap_or_default(),
                    None => data.iter().map(|(k, v)| format!("{k}={v}\n")).collect(),
                };
                files.insert(path.clone(), content);
            }
        }
        out.push(Workload {
            app: name.clone(),
            spec,
            files,
            artifacts: BTreeMap::new(),
            site_api: None,
            revision: crate::fleet::rollout::revision(app),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::model::{AppOverride, ConfigOverride, ConfigSpec, FileSource, NativeSpec};

    fn fleet(nodes: usize, replicas: Option<u32>) -> FleetView {
        let mut f = FleetView::default();
        for i in 0..nodes {
            f.nodes.insert(
                format!("n{i}"),
                NodeSpec {
                    site: if i % 2 == 0 { "a".into() } else { "b".into() },
                    labels: BTreeMap::new(),
                },
            );
        }
        let native = NativeSpec {
            command: vec!["x".into()],
            files: [(
                "c.ini".to_string(),
                FileSource {
                    config: "c".into(),
                    key: None,
                },
            )]
            .into(),
            ..Default::default()
        };
        f.apps.insert(
            "app".into(),
            AppSpec {
                selector: [("site".to_string(), "a".to_string())].into(),
                replicas,
                native: Some(native),
                ..Default::default()
            },
        );
        f.configs.insert(
            "c".into(),
            ConfigSpec {
                data: [("k".to_string(), "1".to_string())].into(),
            },
        );
        f
    }

    #[test]
    fn selector_and_replicas() {
        let f = fleet(10, Some(2));
        let all = |_: &str| true;
        let runners: Vec<String> = f
            .nodes
            .keys()
            .filter(|n| !share(&f, None, n, &all).is_empty())
            .cloned()
            .collect();
        assert_eq!(runners.len(), 2, "{runners:?}");
        assert!(runners.iter().all(|n| f.nodes[n].site == "a"));
        // An unhealthy chosen node hands its replica to another.
        let down = runners[0].clone();
        let healthy = |n: &str| n != down;
        let again: Vec<String> = f
            .nodes
            .keys()
            .filter(|n| n.as_str() != down && !share(&f, None, n, &healthy).is_empty())
            .cloned()
            .collect();
        assert_eq!(again.len(), 2);
        assert!(again.contains(&runners[1]));
    }

    #[test]
    fn site_overrides_apply() {
        let f = fleet(2, None);
        let mut site = SiteOverrideSpec::default();
        site.configs.insert(
            "c".into(),
            ConfigOverride {
                data: [("k".to_string(), "2".to_string())].into(),
            },
        );
        let w = share(&f, Some(&site), "n0", &|_| true);
        assert_eq!(w[0].files["c.ini"], "k=2\n");
        site.apps.insert(
            "app".into(),
            AppOverride {
                paused: Some(true),
                ..Default::default()
            },
        );
        assert!(share(&f, Some(&site), "n0", &|_| true).is_empty());
        assert!(share(&f, None, "unknown", &|_| true).is_empty());
    }
}
