//! The stand-in API server's own tests (`support/apiserver.rs`): that it
//! answers kube-rs as a real server would, for the behaviours the kube
//! runtime's wire tests rely on.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/apiserver.rs"]
mod apiserver;

use apiserver::*;
use futures::{StreamExt, TryStreamExt};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions, WatchEvent,
    WatchParams,
};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use serde_json::{Value, json};
use std::time::Duration;

fn client(url: &str) -> kube::Client {
    node::runtime::kube::install_crypto();
    kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

async fn api(
    client: &kube::Client,
    gvk: (&str, &str, &str),
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let (ar, _) = pinned_kind(client, &GroupVersionKind::gvk(gvk.0, gvk.1, gvk.2))
        .await
        .unwrap();
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

fn shoal() -> PatchParams {
    PatchParams::apply("shoal").force()
}

fn api_error(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn config_map(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "demo", "labels": labels}, "data": {"k": "v"}})
}

fn deployment(image: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "web", "labels": {"app": "web"}},
           "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}})
}

fn shoal_fields(obj: &Value) -> Value {
    let entries = obj["metadata"]["managedFields"].as_array().unwrap();
    entries
        .iter()
        .find(|e| e["manager"] == "shoal" && e["operation"] == "Apply")
        .unwrap()["fieldsV1"]
        .clone()
}

async fn next_event<S>(stream: &mut S) -> WatchEvent<DynamicObject>
where
    S: futures::Stream<Item = kube::Result<WatchEvent<DynamicObject>>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("no watch event within 5 s")
        .unwrap()
        .expect("the watch ended")
}

#[tokio::test]
async fn discovery_serves_builtins_and_a_crd_once_installed() {
    let server = ApiServer::start().await;
    let c = client(&server.url());
    let (ar, caps) = pinned_kind(&c, &GroupVersionKind::gvk("apps", "v1", "Deployment"))
        .await
        .unwrap();
    assert_eq!(
        (ar.plural.as_str(), caps.scope),
        ("deployments", Scope::Namespaced)
    );
    let (_, caps) = pinned_kind(&c, &GroupVersionKind::gvk("", "v1", "Namespace"))
        .await
        .unwrap();
    assert_eq!(caps.scope, Scope::Cluster);
    for version in ["v1", "v2"] {
        let gvk = GroupVersionKind::gvk("autoscaling", version, "HorizontalPodAutoscaler");
        assert_eq!(
            pinned_kind(&c, &gvk).await.unwrap().0.plural,
            "horizontalpodautoscalers"
        );
    }
    let groups = c.list_api_groups().await.unwrap();
    assert!(groups.groups.iter().any(|g| g.name == "networking.k8s.io"));

    let widget = GroupVersionKind::gvk("example.com", "v1", "Widget");
    assert_eq!(
        api_error(pinned_kind(&c, &widget).await.unwrap_err()).code,
        404
    );
    server.add_crd("example.com", "v1", "Widget", "widgets", true);
    let (ar, caps) = pinned_kind(&c, &widget).await.unwrap();
    assert_eq!(
        (ar.plural.as_str(), caps.scope),
        ("widgets", Scope::Namespaced)
    );
}

#[tokio::test]
async fn apply_creates_then_updates_in_place() {
    let server = ApiServer::start().await;
    let c = client(&server.url());
    let deploys = api(&c, ("apps", "v1", "Deployment"), Some("demo")).await;
    let err = api_error(
        deploys
            .patch("web", &shoal(), &Patch::Apply(deployment("nginx:1")))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (err.code, err.message.as_str()),
        (404, "namespaces \"demo\" not found")
    );

    server.put(namespace("demo"));
    let first = deploys
        .patch("web", &shoal(), &Patch::Apply(deployment("nginx:1")))
        .await
        .unwrap();
    assert_eq!(first.metadata.generation, Some(1));
    let stored = server
        .get("apps/v1", "Deployment", Some("demo"), "web")
        .unwrap();
    assert_eq!(
        shoal_fields(&stored)["f:metadata"],
        json!({"f:labels": {"f:app": {}}})
    );
    let again = deploys
        .patch("web", &shoal(), &Patch::Apply(deployment("nginx:1")))
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version, first.metadata.resource_version,
        "a no-op apply writes nothing"
    );

    let mut body = deployment("nginx:2");
    body["metadata"].as_object_mut().unwrap().remove("labels");
    let second = deploys
        .patch("web", &shoal(), &Patch::Apply(body))
        .await
        .unwrap();
    assert_eq!(second.metadata.uid, first.metadata.uid);
    assert_eq!(second.metadata.generation, Some(2));
    assert_eq!(
        second.metadata.labels, None,
        "a label shoal left out is gone"
    );
    assert_eq!(
        second.data["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:2"
    );

    let mut typo = deployment("nginx:2");
    typo["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always".into();
    let strict = api_error(
        deploys
            .patch("web", &shoal().validation_strict(), &Patch::Apply(&typo))
            .await
            .unwrap_err(),
    );
    assert_eq!(strict.code, 400);
    assert!(
        strict
            .message
            .ends_with("unknown field \"spec.template.spec.containers[0].imagePulPolicy\""),
        "{strict:?}"
    );
    let lax = api_error(
        deploys
            .patch("web", &shoal(), &Patch::Apply(&typo))
            .await
            .unwrap_err(),
    );
    assert_eq!(lax.code, 500);
    assert!(lax.message.contains(".spec.template.spec.containers[name=\"web\"].imagePulPolicy: field not declared in schema"), "{lax:?}");
}

#[tokio::test]
async fn edits_by_hand_take_over_only_the_fields_they_change() {
    let server = ApiServer::start().await;
    let c = client(&server.url());
    server.put(namespace("demo"));
    let deploys = api(&c, ("apps", "v1", "Deployment"), Some("demo")).await;
    deploys
        .patch("web", &shoal(), &Patch::Apply(deployment("nginx:1")))
        .await
        .unwrap();
    let get = || {
        server
            .get("apps/v1", "Deployment", Some("demo"), "web")
            .unwrap()
    };
    let before = shoal_fields(&get());

    server.edit_by_hand("apps/v1", "Deployment", Some("demo"), "web", |o| {
        o["metadata"]["annotations"] = json!({"note": "by hand"});
    });
    assert_eq!(
        shoal_fields(&get()),
        before,
        "an annotation shoal never applied"
    );
    assert_eq!(get()["metadata"]["generation"], 1);

    server.edit_by_hand("apps/v1", "Deployment", Some("demo"), "web", |o| {
        o["spec"]["replicas"] = 5.into()
    });
    let after = shoal_fields(&get());
    assert_ne!(after, before);
    assert!(
        after["f:spec"].get("f:replicas").is_none() && after["f:spec"].get("f:template").is_some()
    );
    assert_eq!(get()["metadata"]["generation"], 2);

    server.set_status(
        "apps/v1",
        "Deployment",
        Some("demo"),
        "web",
        json!({"availableReplicas": 5}),
    );
    assert_eq!(shoal_fields(&get()), after);
    assert_eq!(
        deploys.get("web").await.unwrap().data["status"]["availableReplicas"],
        5
    );
}

#[tokio::test]
async fn lists_and_watches_by_label() {
    let server = ApiServer::start().await;
    let c = client(&server.url());
    server.put(namespace("demo"));
    server.put(config_map("a", json!({"tier": "edge"})));
    server.put(config_map("b", json!({"tier": "core"})));
    server.put(config_map("c", json!({})));
    let cms = api(&c, ("", "v1", "ConfigMap"), Some("demo")).await;
    let names = |l: kube::core::ObjectList<DynamicObject>| -> Vec<String> {
        l.items
            .into_iter()
            .map(|o| o.metadata.name.unwrap())
            .collect()
    };
    for (selector, want) in [
        ("tier=edge", vec!["a"]),
        ("tier", vec!["a", "b"]),
        ("tier!=edge", vec!["b", "c"]),
        ("", vec!["a", "b", "c"]),
    ] {
        let listed = cms
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap();
        assert_eq!(names(listed), want, "{selector}");
    }
    assert!(
        server
            .requests()
            .iter()
            .any(|s| s.query.contains("labelSelector=tier%3Dedge"))
    );

    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut events = cms
        .watch(&WatchParams::default().labels("tier=edge"), &rv)
        .await
        .unwrap()
        .boxed();
    server.edit_by_hand("v1", "ConfigMap", Some("demo"), "a", |o| {
        o["data"]["k"] = "edited".into()
    });
    match next_event(&mut events).await {
        WatchEvent::Modified(o) => assert_eq!(o.data["data"]["k"], "edited"),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    server.edit_by_hand("v1", "ConfigMap", Some("demo"), "b", |o| {
        o["metadata"]["labels"]["tier"] = "edge".into()
    });
    assert!(
        matches!(next_event(&mut events).await, WatchEvent::Added(o) if o.metadata.name.as_deref() == Some("b"))
    );
    server.edit_by_hand("v1", "ConfigMap", Some("demo"), "a", |o| {
        o["metadata"]["labels"]["tier"] = "core".into()
    });
    assert!(
        matches!(next_event(&mut events).await, WatchEvent::Deleted(o) if o.metadata.name.as_deref() == Some("a"))
    );
    server.delete_by_hand("v1", "ConfigMap", Some("demo"), "b");
    assert!(
        matches!(next_event(&mut events).await, WatchEvent::Deleted(o) if o.metadata.name.as_deref() == Some("b"))
    );
    assert_eq!(server.count("GET", "/configmaps"), 6);
}

#[tokio::test]
async fn delete_checks_the_uid_and_a_namespace_takes_its_objects() {
    let server = ApiServer::start().await;
    let c = client(&server.url());
    server.put(namespace("demo"));
    let uid = server.put(config_map("cfg", json!({})))["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let cms = api(&c, ("", "v1", "ConfigMap"), Some("demo")).await;
    let with_uid = |uid: &str| DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    let err = api_error(cms.delete("cfg", &with_uid("not-it")).await.unwrap_err());
    assert_eq!(err.code, 409);
    assert_eq!(
        err.message,
        format!("Precondition failed: UID in precondition: not-it, UID in object meta: {uid}")
    );
    cms.delete("cfg", &with_uid(&uid)).await.unwrap();
    assert_eq!(api_error(cms.get("cfg").await.unwrap_err()).code, 404);
    assert_eq!(
        api_error(
            cms.delete("cfg", &DeleteParams::default())
                .await
                .unwrap_err()
        )
        .code,
        404
    );

    server.put(config_map("other", json!({})));
    let namespaces = api(&c, ("", "v1", "Namespace"), None).await;
    namespaces
        .delete("demo", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        server
            .get("v1", "ConfigMap", Some("demo"), "other")
            .is_none()
    );

    server.refuse(
        "*",
        "/namespaces/demo$",
        403,
        "Forbidden",
        "namespaces \"demo\" is forbidden",
    );
    assert_eq!(
        api_error(namespaces.get("demo").await.unwrap_err()).code,
        403
    );
    // What is in the namespace is not refused.
    assert!(cms.list(&ListParams::default()).await.is_ok());
    server.allow_all();
    assert_eq!(
        api_error(namespaces.get("demo").await.unwrap_err()).code,
        404
    );
    let created = namespaces
        .create(
            &Default::default(),
            &serde_json::from_value(namespace("demo")).unwrap(),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    let again = namespaces
        .create(
            &Default::default(),
            &serde_json::from_value(namespace("demo")).unwrap(),
        )
        .await;
    assert_eq!(api_error(again.unwrap_err()).reason, "AlreadyExists");
}

#[tokio::test]
async fn stop_is_an_outage_and_resume_keeps_the_state() {
    let server = ApiServer::start().await;
    let c = client(&server.url());
    server.put(namespace("demo"));
    let cms = api(&c, ("", "v1", "ConfigMap"), Some("demo")).await;
    let body = config_map("cfg", json!({}));
    let first = cms
        .patch("cfg", &shoal(), &Patch::Apply(&body))
        .await
        .unwrap();
    let mut events = cms
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next_event(&mut events).await,
        WatchEvent::Added(_)
    ));

    for _ in 0..2 {
        server.stop().await;
        let ended = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("the watch did not end");
        assert!(!matches!(ended, Some(Ok(_))), "{ended:?}");
        let err = cms.get("cfg").await.unwrap_err();
        assert!(
            matches!(err, kube::Error::HyperError(_) | kube::Error::Service(_)),
            "{err:?}"
        );

        server.resume().await;
        let back = cms.get("cfg").await.unwrap();
        assert_eq!(back.metadata.uid, first.metadata.uid);
        events = cms
            .watch(&WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        assert!(matches!(
            next_event(&mut events).await,
            WatchEvent::Added(_)
        ));
    }
    server.put(config_map("new", json!({})));
    let rv: u64 =
        server.get("v1", "ConfigMap", Some("demo"), "new").unwrap()["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    assert!(rv > first.metadata.resource_version.unwrap().parse().unwrap());
}
