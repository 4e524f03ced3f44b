//! Rollout status of a workload object, as `kubectl rollout status` says
//! it: a pure function of the object the API server returned.
//!
//! The rules follow kubectl's (`polymorphichelpers/rollout_status.go`):
//! a Deployment is done when the controller has observed its generation
//! and every replica is updated, no old replica is left and every updated
//! one is available; `ProgressDeadlineExceeded` is a failure. A
//! StatefulSet with `RollingUpdate` is done when every replica is ready
//! and either the partition's share is updated or the current revision
//! is the update revision. A DaemonSet with `RollingUpdate` is done when
//! every scheduled pod is updated and available. Kinds without rollout
//! fields (and `OnDelete` strategies, which kubectl refuses to follow)
//! are done once ready, where they say so.

use serde_json::Value;

/// Where a rollout stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// Complete: what runs is what was applied.
    Done,
    /// Still moving; the words say how far, as kubectl says them.
    Waiting(String),
    /// It will not finish by itself (the progress deadline passed).
    Failed(String),
}

/// Does a `kind` of API `group` carry rollout status? (Only the `apps`
/// group's: a custom resource that happens to be called `Deployment` does
/// not.)
pub fn has_rollout(group: &str, kind: &str) -> bool {
    group == "apps" && matches!(kind, "Deployment" | "StatefulSet" | "DaemonSet")
}

fn int(v: &Value, pointer: &str) -> Option<i64> {
    v.pointer(pointer).and_then(Value::as_i64)
}

fn observed(obj: &Value) -> bool {
    let generation = int(obj, "/metadata/generation").unwrap_or(0);
    let seen = int(obj, "/status/observedGeneration").unwrap_or(0);
    seen > 0 && generation <= seen
}

/// The rollout status of `obj`, a `kind` object as the API server holds it.
pub fn status(kind: &str, obj: &Value) -> Rollout {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    match kind {
        "Deployment" => deployment(name, obj),
        "StatefulSet" => stateful_set(name, obj),
        "DaemonSet" => daemon_set(name, obj),
        _ => Rollout::Done,
    }
}

fn deployment(name: &str, d: &Value) -> Rollout {
    if !observed(d) {
        return Rollout::Waiting(format!(
            "Deployment {name}: waiting for the deployment spec update to be observed"
        ));
    }
    let deadline = d
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Progressing"))
        .filter(|c| c.get("reason").and_then(Value::as_str) == Some("ProgressDeadlineExceeded"));
    if let Some(c) = deadline {
        let msg = c.get("message").and_then(Value::as_str).unwrap_or("");
        return Rollout::Failed(format!(
            "Deployment {name} exceeded its progress deadline{}",
            if msg.is_empty() {
                String::new()
            } else {
                format!(": {msg}")
            }
        ));
    }
    let want = int(d, "/spec/replicas").unwrap_or(1);
    let updated = int(d, "/status/updatedReplicas").unwrap_or(0);
    let replicas = int(d, "/status/replicas").unwrap_or(0);
    let available = int(d, "/status/availableReplicas").unwrap_or(0);
    if updated < want {
        return Rollout::Waiting(format!(
            "Deployment {name}: {updated} out of {want} new replicas have been updated"
        ));
    }
    if replicas > updated {
        return Rollout::Waiting(format!(
            "Deployment {name}: {} old replicas are pending termination",
            replicas - updated
        ));
    }
    if available < updated {
        return Rollout::Waiting(format!(
            "Deployment {name}: {available} of {updated} updated replicas are available"
        ));
    }
    Rollout::Done
}

fn strategy(obj: &Value) -> &str {
    obj.pointer("/spec/updateStrategy/type")
        .and_then(Value::as_str)
        .unwrap_or("RollingUpdate")
}

fn stateful_set(name: &str, s: &Value) -> Rollout {
    if !observed(s) {
        return Rollout::Waiting(format!(
            "StatefulSet {name}: waiting for the statefulset spec update to be observed"
        ));
    }
    let want = int(s, "/spec/replicas").unwrap_or(1);
    let ready = int(s, "/status/readyReplicas").unwrap_or(0);
    if ready < want {
        return Rollout::Waiting(format!(
            "StatefulSet {name}: waiting for {} pods to be ready",
            want - ready
        ));
    }
    if strategy(s) != "RollingUpdate" {
        // OnDelete: pods change only when deleted; ready is all we can say.
        return Rollout::Done;
    }
    if let Some(partition) = int(s, "/spec/updateStrategy/rollingUpdate/partition") {
        let updated = int(s, "/status/updatedReplicas").unwrap_or(0);
        let share = (want - partition).max(0);
        if updated < share {
            return Rollout::Waiting(format!(
                "StatefulSet {name}: waiting for partitioned roll out to finish: {updated} out of {share} new pods have been updated"
            ));
        }
        return Rollout::Done;
    }
    let current = s.pointer("/status/currentRevision").and_then(Value::as_str);
    let update = s.pointer("/status/updateRevision").and_then(Value::as_str);
    if update != current {
        let updated = int(s, "/status/updatedReplicas").unwrap_or(0);
        return Rollout::Waiting(format!(
            "StatefulSet {name}: waiting for rolling update to complete {updated} pods at revision {}",
            update.unwrap_or("?")
        ));
    }
    Rollout::Done
}

fn daemon_set(name: &str, d: &Value) -> Rollout {
    if !observed(d) {
        return Rollout::Waiting(format!(
            "DaemonSet {name}: waiting for the daemon set spec update to be observed"
        ));
    }
    let want = int(d, "/status/desiredNumberScheduled").unwrap_or(0);
    let available = int(d, "/status/numberAvailable").unwrap_or(0);
    if strategy(d) == "RollingUpdate" {
        let updated = int(d, "/status/updatedNumberScheduled").unwrap_or(0);
        if updated < want {
            return Rollout::Waiting(format!(
                "DaemonSet {name}: {updated} out of {want} new pods have been updated"
            ));
        }
    }
    if available < want {
        return Rollout::Waiting(format!(
            "DaemonSet {name}: {available} of {want} updated pods are available"
        ));
    }
    Rollout::Done
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deploy(generation: i64, status: Value) -> Value {
        json!({"metadata": {"name": "web", "generation": generation},
               "spec": {"replicas": 3}, "status": status})
    }

    #[test]
    fn deployment_follows_kubectl() {
        // Not yet observed by the controller.
        let d = deploy(
            2,
            json!({"observedGeneration": 1, "updatedReplicas": 3,
                                 "replicas": 3, "availableReplicas": 3}),
        );
        assert!(matches!(status("Deployment", &d), Rollout::Waiting(m) if m.contains("observed")));
        // Mid-rollout: all available, but only one updated.
        let d = deploy(
            2,
            json!({"observedGeneration": 2, "updatedReplicas": 1,
                                 "replicas": 4, "availableReplicas": 3}),
        );
        assert_eq!(
            status("Deployment", &d),
            Rollout::Waiting("Deployment web: 1 out of 3 new replicas have been updated".into())
        );
        let d = deploy(
            2,
            json!({"observedGeneration": 2, "updatedReplicas": 3,
                                 "replicas": 4, "availableReplicas": 3}),
        );
        assert_eq!(
            status("Deployment", &d),
            Rollout::Waiting("Deployment web: 1 old replicas are pending termination".into())
        );
        let d = deploy(
            2,
            json!({"observedGeneration": 2, "updatedReplicas": 3,
                                 "replicas": 3, "availableReplicas": 2}),
        );
        assert_eq!(
            status("Deployment", &d),
            Rollout::Waiting("Deployment web: 2 of 3 updated replicas are available".into())
        );
        let d = deploy(
            2,
            json!({"observedGeneration": 2, "updatedReplicas": 3,
                                 "replicas": 3, "availableReplicas": 3}),
        );
        assert_eq!(status("Deployment", &d), Rollout::Done);
        let d = deploy(
            2,
            json!({"observedGeneration": 2, "updatedReplicas": 1,
            "conditions": [{"type": "Progressing", "status": "False",
                            "reason": "ProgressDeadlineExceeded",
                            "message": "ReplicaSet \"web-5d\" has timed out progressing."}]}),
        );
        assert!(
            matches!(status("Deployment", &d), Rollout::Failed(m) if m.contains("progress deadline") && m.contains("timed out"))
        );
        // No status at all: a fresh object nobody has looked at.
        assert!(matches!(
            status(
                "Deployment",
                &json!({"metadata": {"name": "web", "generation": 1}})
            ),
            Rollout::Waiting(_)
        ));
    }

    #[test]
    fn stateful_set_follows_kubectl() {
        let s = |spec: Value, st: Value| json!({"metadata": {"name": "db", "generation": 1}, "spec": spec, "status": st});
        let base = json!({"observedGeneration": 1, "readyReplicas": 2, "updatedReplicas": 1,
                          "currentRevision": "db-1", "updateRevision": "db-2"});
        assert_eq!(
            status("StatefulSet", &s(json!({"replicas": 3}), base.clone())),
            Rollout::Waiting("StatefulSet db: waiting for 1 pods to be ready".into())
        );
        assert!(matches!(
            status("StatefulSet", &s(json!({"replicas": 2}), base.clone())),
            Rollout::Waiting(m) if m.contains("revision db-2")
        ));
        // A partition of 1 out of 2: one updated pod is the whole rollout.
        let part = json!({"replicas": 2, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}});
        assert_eq!(status("StatefulSet", &s(part, base.clone())), Rollout::Done);
        let part0 = json!({"replicas": 2, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}});
        assert!(matches!(
            status("StatefulSet", &s(part0, base.clone())),
            Rollout::Waiting(m) if m.contains("1 out of 2 new pods")
        ));
        let mut done = base.clone();
        done["currentRevision"] = json!("db-2");
        assert_eq!(
            status("StatefulSet", &s(json!({"replicas": 2}), done)),
            Rollout::Done
        );
        let on_delete = json!({"replicas": 2, "updateStrategy": {"type": "OnDelete"}});
        assert_eq!(status("StatefulSet", &s(on_delete, base)), Rollout::Done);
    }

    #[test]
    fn daemon_set_follows_kubectl() {
        let d = |st: Value| json!({"metadata": {"name": "agent", "generation": 3}, "status": st});
        assert!(matches!(
            status("DaemonSet", &d(json!({"observedGeneration": 2}))),
            Rollout::Waiting(m) if m.contains("observed")
        ));
        assert_eq!(
            status(
                "DaemonSet",
                &d(json!({"observedGeneration": 3, "desiredNumberScheduled": 4,
                                          "updatedNumberScheduled": 2, "numberAvailable": 4}))
            ),
            Rollout::Waiting("DaemonSet agent: 2 out of 4 new pods have been updated".into())
        );
        assert_eq!(
            status(
                "DaemonSet",
                &d(json!({"observedGeneration": 3, "desiredNumberScheduled": 4,
                                          "updatedNumberScheduled": 4, "numberAvailable": 3}))
            ),
            Rollout::Waiting("DaemonSet agent: 3 of 4 updated pods are available".into())
        );
        assert_eq!(
            status(
                "DaemonSet",
                &d(json!({"observedGeneration": 3, "desiredNumberScheduled": 4,
                                          "updatedNumberScheduled": 4, "numberAvailable": 4}))
            ),
            Rollout::Done
        );
        // No nodes to schedule on: nothing to wait for.
        assert_eq!(
            status(
                "DaemonSet",
                &d(json!({"observedGeneration": 3, "desiredNumberScheduled": 0}))
            ),
            Rollout::Done
        );
        assert_eq!(status("ConfigMap", &json!({})), Rollout::Done);
    }
}
