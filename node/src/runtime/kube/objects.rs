//! An app's manifests as the objects Shoal applies: parsed, checked, and
//! labelled. Pure: what the cluster says about each kind (its scope) is
//! passed in later.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Label on everything Shoal applies.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "shoal");
/// Label naming the app an object belongs to.
pub const APP_LABEL: &str = "shoal.dev/app";

/// One object of an app's manifests.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// 1-based position among the app's manifests.
    pub index: usize,
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
    /// The object as written.
    pub body: Value,
}

impl Manifest {
    /// Where it came from, for messages: `manifest 2`, or Shoal's own.
    pub fn place(&self) -> String {
        match self.index {
            0 => "added by Shoal".into(),
            i => format!("manifest {i}"),
        }
    }

    /// The API group (`""` for core).
    pub fn group(&self) -> &str {
        group_of(&self.api_version)
    }

    /// The body Shoal applies: Shoal's labels added beside the app's own,
    /// and the namespace set (`Some`) or removed (cluster-scoped, `None`).
    pub fn prepared(&self, app: &str, namespace: Option<&str>) -> Value {
        let mut v = self.body.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            match namespace {
                Some(ns) => {
                    meta.insert("namespace".into(), json!(ns));
                }
                None => {
                    meta.remove("namespace");
                }
            }
            let mut l = meta
                .get("labels")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            l.insert(MANAGED_BY.0.into(), json!(MANAGED_BY.1));
            l.insert(APP_LABEL.into(), json!(app));
            meta.insert("labels".into(), Value::Object(l));
        }
        v
    }
}

/// Where a pod finds its app's artifacts: `/shoal/artifacts/<name>`.
pub const ARTIFACTS_MOUNT: &str = "/shoal/artifacts";

/// Gives every pod an object describes (a Pod, or the pod template of a
/// Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob) its app's
/// artifacts: each blob (a file on this node, `artifacts`: the app's name
/// for it → its path) as a read-only hostPath volume mounted at
/// `/shoal/artifacts/<name>` in every container, and
/// `SHOAL_ARTIFACT_<NAME>` naming that path, as the native runtime does.
/// A new version of an artifact is a new path, so the pods roll.
pub fn mount_artifacts(body: &mut Value, artifacts: &std::collections::BTreeMap<String, String>) {
    if artifacts.is_empty() {
        return;
    }
    let Some(pod) = pod_spec(body) else {
        return;
    };
    let volume = |local: &str| {
        let mut n = format!(
            "shoal-artifact-{}",
            local.to_ascii_lowercase().replace('_', "-")
        );
        n.truncate(63);
        n.trim_end_matches('-').to_string()
    };
    let volumes = pod
        .entry("volumes")
        .or_insert_with(|| json!([]))
        .as_array_mut();
    if let Some(volumes) = volumes {
        for (local, host) in artifacts {
            volumes.push(json!({
                "name": volume(local),
                "hostPath": {"path": host, "type": "File"},
            }));
        }
    }
    for list in ["containers", "initContainers"] {
        let Some(containers) = pod.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
            for local in artifacts.keys() {
                let at = format!("{ARTIFACTS_MOUNT}/{local}");
                if let Some(m) = c
                    .entry("volumeMounts")
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                {
                    m.push(json!({"name": volume(local), "mountPath": at, "readOnly": true}));
                }
                if let Some(e) = c.entry("env").or_insert_with(|| json!([])).as_array_mut() {
                    e.push(json!({
                        "name": crate::runtime::native::artifact_var(local),
                        "value": at,
                    }));
                }
            }
        }
    }
}

/// The pod spec an object describes: a Pod's own, or the pod template's of
/// a Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob.
fn pod_spec(body: &mut Value) -> Option<&mut serde_json::Map<String, Value>> {
    pod_part(body, "spec")
}

/// The metadata of the pods an object describes (see [`pod_spec`]).
fn pod_meta(body: &mut Value) -> Option<&mut serde_json::Map<String, Value>> {
    pod_part(body, "metadata")
}

fn pod_part<'a>(body: &'a mut Value, part: &str) -> Option<&'a mut serde_json::Map<String, Value>> {
    let kind = body.get("kind").and_then(Value::as_str).unwrap_or("");
    let path: &[&str] = match kind {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    };
    let mut at = body;
    for k in path {
        at = at.get_mut(*k)?;
    }
    at.as_object_mut()?
        .entry(part)
        .or_insert_with(|| json!({}))
        .as_object_mut()
}

/// The Secret holding an app's site API token: `shoal-<app>-token` in the
/// app's namespace.
pub fn token_secret_name(app: &str) -> String {
    format!("shoal-{app}-token")
}

/// Key of the token in that Secret.
pub const TOKEN_KEY: &str = "token";

/// The Secret Shoal adds to an app's objects when the node has a site API:
/// the app's token, so that it is not readable from the Deployment. Applied,
/// recorded, watched and pruned like the app's own objects.
pub fn token_secret(app: &str, token: &str) -> Manifest {
    let data = serde_json::to_value(k8s_openapi::ByteString(token.as_bytes().to_vec()))
        .unwrap_or_default();
    let name = token_secret_name(app);
    Manifest {
        index: 0,
        api_version: "v1".into(),
        kind: "Secret".into(),
        name: name.clone(),
        body: json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "type": "Opaque",
            "data": {TOKEN_KEY: data},
        }),
    }
}

/// Annotation on an app's pods: a digest of its token, so that pods roll
/// (and read the new one) when the node's app key changes.
pub const TOKEN_DIGEST: &str = "shoal.dev/app-token-sha256";

/// Gives every container of every pod an object describes its node's site
/// API: `SHOAL_SITE_API` (the URL; `$(SHOAL_NODE_IP)` in it is the pod's
/// host IP, from the downward API), `SHOAL_SITE_API_CA_PEM` (the site
/// API's certificate to trust, when it serves HTTPS) and `SHOAL_APP_TOKEN`
/// from the app's token Secret. Variables of these names the app set are replaced.
pub fn give_site_api(body: &mut Value, app: &str, access: &crdt_state::fleet::placement::SiteApi) {
    let digest = hex::encode(&Sha256::digest(access.token.as_bytes())[..8]);
    let Some(meta) = pod_meta(body) else {
        return;
    };
    if let Some(a) = meta
        .entry("annotations")
        .or_insert_with(|| json!({}))
        .as_object_mut()
    {
        a.insert(TOKEN_DIGEST.into(), json!(digest));
    }
    let Some(pod) = pod_spec(body) else {
        return;
    };
    let mut vars = Vec::new();
    if access.url.contains("$(SHOAL_NODE_IP)") {
        vars.push(json!({
            "name": "SHOAL_NODE_IP",
            "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}},
        }));
    }
    vars.push(json!({"name": "SHOAL_SITE_API", "value": access.url}));
    if let Some(pem) = &access.ca_pem {
        // Public: the certificate the node's site API presents, to trust.
        vars.push(json!({"name": "SHOAL_SITE_API_CA_PEM", "value": pem}));
    }
    vars.push(json!({
        "name": "SHOAL_APP_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": token_secret_name(app), "key": TOKEN_KEY}},
    }));
    for list in ["containers", "initContainers"] {
        let Some(containers) = pod.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(e) = c.entry("env").or_insert_with(|| json!([])).as_array_mut() {
                e.retain(|v| {
                    !vars
                        .iter()
                        .any(|n| n.get("name").is_some() && v.get("name") == n.get("name"))
                });
                e.extend(vars.iter().cloned());
            }
        }
    }
}

/// The group of an apiVersion (`apps/v1` → `apps`, `v1` → ``).
pub fn group_of(api_version: &str) -> &str {
    api_version.split_once('/').map(|(g, _)| g).unwrap_or("")
}

/// The label selector of everything Shoal applies, or of one app's objects.
pub fn selector(app: Option<&str>) -> String {
    match app {
        Some(a) => format!("{}={},{APP_LABEL}={a}", MANAGED_BY.0, MANAGED_BY.1),
        None => format!("{}={}", MANAGED_BY.0, MANAGED_BY.1),
    }
}

/// A stable hash of a JSON value.
pub fn hash(v: &Value) -> String {
    hex::encode(&Sha256::digest(v.to_string().as_bytes())[..16])
}

/// Parses an app's manifests. Refuses an object without apiVersion, kind
/// or name, and one whose `metadata.namespace` is not the app's namespace
/// `ns` (Shoal never moves an object silently).
pub fn parse(ns: &str, manifests: &str) -> Result<Vec<Manifest>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(manifests).enumerate() {
        let index = i + 1;
        let v: Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| format!("manifest {index}: not YAML: {e}"))?;
        if v.is_null() {
            continue;
        }
        let field = |p: &str, what: &str| {
            v.pointer(p)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .ok_or_else(|| format!("manifest {index}: missing {what}"))
        };
        let api_version = field("/apiVersion", "apiVersion")?;
        let kind = field("/kind", "kind")?;
        let name = field("/metadata/name", "metadata.name")?;
        if let Some((_, msg)) = crdt_state::fleet::manifest::kube_object_problem(
            ns,
            &api_version,
            &kind,
            &name,
            v.pointer("/metadata/namespace").and_then(Value::as_str),
        ) {
            return Err(format!("manifest {index}: {msg}"));
        }
        if out.iter().any(|m: &Manifest| {
            m.kind == kind && m.name == name && m.group() == group_of(&api_version)
        }) {
            return Err(format!("manifest {index}: {kind} {name} appears twice"));
        }
        out.push(Manifest {
            index,
            api_version,
            kind,
            name,
            body: v,
        });
    }
    Ok(out)
}

/// A hash of what Shoal's field manager owns in `obj` (its `Apply` entry
/// in `metadata.managedFields`), or `None` when it owns nothing there.
/// Another writer changing a field Shoal set takes that field's ownership
/// away, which changes this hash; a controller writing status, or someone
/// adding a field Shoal never set, does not.
pub fn owned_fields(obj: &Value, manager: &str) -> Option<String> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)?
        .iter()
        .find(|e| {
            e.get("manager").and_then(Value::as_str) == Some(manager)
                && e.get("operation").and_then(Value::as_str) == Some("Apply")
                && e.get("subresource").is_none_or(|s| s.as_str() == Some(""))
        })
        .and_then(|e| e.get("fieldsV1"))
        .map(hash)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_and_labels() -> anyhow::Result<()> {
        let m = parse(
            "shoal-web",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, labels: {tier: edge}}\n---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: shoal-web}\n",
        )
        .map_err(anyhow::Error::msg)?;
        assert_eq!(m.len(), 2);
        assert_eq!((m[1].index, m[1].group()), (3, "apps"));
        let p = m[0].prepared("web", Some("shoal-web"));
        assert_eq!(p["metadata"]["namespace"], "shoal-web");
        assert_eq!(p["metadata"]["labels"]["tier"], "edge");
        assert_eq!(p["metadata"]["labels"][APP_LABEL], "web");
        let cluster = m[1].prepared("web", None);
        assert!(cluster["metadata"].get("namespace").is_none());

        let e = parse(
            "shoal-web",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: kube-system}\n",
        )
        .unwrap_err();
        assert!(
            e.contains("names namespace kube-system") && e.contains("shoal-web"),
            "{e}"
        );
        let e = parse("n", "kind: ConfigMap\nmetadata: {name: a}\n").unwrap_err();
        assert_eq!(e, "manifest 1: missing apiVersion");
        let e = parse("n", "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n").unwrap_err();
        assert_eq!(e, "manifest 1: missing metadata.name");
        let e = parse(
            "n",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n",
        )
        .unwrap_err();
        assert!(
            e.contains("Namespace n: an app's namespace is spec.kube.namespace"),
            "{e}"
        );
        let twice = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n";
        let e = parse("n", &format!("{twice}---\n{twice}")).unwrap_err();
        assert!(e.contains("appears twice"), "{e}");
        assert!(
            parse("n", "a: [")
                .unwrap_err()
                .starts_with("manifest 1: not YAML")
        );
        Ok(())
    }

    #[test]
    fn pods_get_their_artifacts_read_only() -> anyhow::Result<()> {
        let ms = parse(
            "shoal-web",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n      containers: [{name: a, image: x, env: [{name: K, value: v}]}]\n      initContainers: [{name: i, image: y}]\n---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          volumes: [{name: data, emptyDir: {}}]\n          containers: [{name: b, image: z}]\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: m}\ndata: {k: v}\n",
        )
        .map_err(anyhow::Error::msg)?;
        let artifacts = std::collections::BTreeMap::from([(
            "Model_v".to_string(),
            "/var/lib/shoal/blobs/ab12".to_string(),
        )]);
        let mut d = ms[0].prepared("web", Some("shoal-web"));
        mount_artifacts(&mut d, &artifacts);
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(
            pod["volumes"],
            json!([{"name": "shoal-artifact-model-v", "hostPath": {"path": "/var/lib/shoal/blobs/ab12", "type": "File"}}])
        );
        for c in ["containers", "initContainers"] {
            let c = &pod[c][0];
            assert_eq!(
                c["volumeMounts"],
                json!([{"name": "shoal-artifact-model-v", "mountPath": "/shoal/artifacts/Model_v", "readOnly": true}])
            );
            let env = c["env"].as_array().ok_or_else(|| anyhow::anyhow!("env"))?;
            assert!(env.contains(
                &json!({"name": "SHOAL_ARTIFACT_MODEL_V", "value": "/shoal/artifacts/Model_v"})
            ));
        }
        assert_eq!(
            pod["containers"][0]["env"][0],
            json!({"name": "K", "value": "v"}),
            "the app's own env kept first"
        );
        let mut c = ms[1].prepared("web", Some("shoal-web"));
        mount_artifacts(&mut c, &artifacts);
        let pod = &c["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(
            pod["volumes"].as_array().map(Vec::len),
            Some(2),
            "its own volume kept"
        );
        assert_eq!(pod["containers"][0]["volumeMounts"][0]["readOnly"], true);
        // Objects without pods are left alone.
        let before = ms[2].prepared("web", Some("shoal-web"));
        let mut m = before.clone();
        mount_artifacts(&mut m, &artifacts);
        assert_eq!(m, before);
        // No artifacts: nothing changes (the object's hash stays).
        let mut same = ms[0].prepared("web", Some("shoal-web"));
        mount_artifacts(&mut same, &Default::default());
        assert_eq!(same, ms[0].prepared("web", Some("shoal-web")));
        Ok(())
    }

    #[test]
    fn owned_fields_change_only_with_shoals_entry() {
        let obj = |fields: Value, other: Value| {
            json!({"metadata": {"managedFields": [
                {"manager": "shoal", "operation": "Apply", "fieldsV1": fields},
                {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status", "fieldsV1": other},
            ]}})
        };
        let a = owned_fields(
            &obj(json!({"f:data": {"f:k": {}}}), json!({"f:status": {}})),
            "shoal",
        );
        let b = owned_fields(
            &obj(
                json!({"f:data": {"f:k": {}}}),
                json!({"f:status": {"f:x": {}}}),
            ),
            "shoal",
        );
        let c = owned_fields(
            &obj(json!({"f:data": {}}), json!({"f:status": {}})),
            "shoal",
        );
        assert!(a.is_some());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(owned_fields(&json!({"metadata": {}}), "shoal"), None);
    }
}
