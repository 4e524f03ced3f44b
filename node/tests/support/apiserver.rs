//! A stand-in for a Kubernetes API server, held in memory, for the kube
//! runtime's wire tests. No real API server can be installed on the CI
//! machines, so this one answers kube-rs over plain HTTP on loopback with the
//! paths, status codes and JSON shapes a real one uses, and lets a test play
//! the other actors of a cluster (an operator with kubectl, a controller
//! writing status, RBAC, an outage).
//!
//! What it emulates:
//! - discovery (`/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`) for a
//!   fixed table of built-in kinds, plus custom resources registered at run
//!   time with [`ApiServer::add_crd`];
//! - storage keyed by group, resource, namespace and name (so every served
//!   version of a kind sees the same objects), with `uid`, a global
//!   `resourceVersion`, `creationTimestamp` and `generation` (bumped when
//!   `spec` changes);
//! - get, list and watch (with equality and existence label selectors, and
//!   DELETED for an object that stops matching), server-side apply with
//!   `managedFields`, create, delete with `uid`/`resourceVersion`
//!   preconditions, and deletion of a namespace's objects with it. List
//!   items of built-in kinds carry no `apiVersion`/`kind`, as on real
//!   servers (custom resources' items do);
//! - errors as `Status` bodies with the reasons and messages real servers
//!   give (NotFound, AlreadyExists, Conflict, BadRequest, the strict and the
//!   non-strict unknown-field answers), and refusals on demand
//!   ([`ApiServer::refuse`]) to play RBAC;
//! - an outage: [`ApiServer::stop`] closes the port, every connection and
//!   every watch; [`ApiServer::resume`] reopens the same port with the same
//!   state.
//!
//! What it approximates or leaves out:
//! - apply merges maps recursively and replaces everything else (lists are
//!   atomic); keys a manager applied last time and leaves out now are removed
//!   from their map. There are no conflicts between managers (every apply acts
//!   as forced), and a manager's `fieldsV1` is derived from what it applied
//!   (list items with a `name` keyed as `k:{"name":..}`, other lists as one
//!   leaf), minus the leaves another writer changed since
//!   ([`ApiServer::edit_by_hand`]); Update entries (`kubectl`,
//!   `kubectl-edit`, creates) are never shrunk by later applies. An apply
//!   that changes nothing writes nothing, as on a real server;
//! - no schemas: the only unknown fields are keys named `imagePulPolicy` or
//!   starting with `bogus` (outside free-form maps such as labels or data);
//!   with `fieldValidation=Strict` they get the 400 of strict decoding,
//!   without it the 500 of the field manager;
//! - `status` in an applied or created body is ignored, as if every kind had
//!   a status subresource (which only discovery lists);
//! - no admission, defaulting, validation, authentication or TLS, no
//!   finalizers, graceful deletion or garbage collection by owner: a deleted
//!   namespace and its objects are gone at once;
//! - no bookmarks, field selectors, set-based label selectors, merge or JSON
//!   patches (415), subresource requests, protobuf or aggregated discovery.
//!   The whole event history is kept, so no watch is ever too old (410).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The raw query string, still URL-encoded.
    pub query: String,
    pub content_type: String,
    /// The body as JSON; `Null` when empty or not JSON.
    pub body: Value,
}

/// The handle tests hold: the server's state and its listening task.
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
}

/// One run between `start`/`resume` and `stop`.
struct Running {
    /// Set to `true` to stop accepting, end every watch and close.
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A kind the server serves: one row of discovery.
#[derive(Clone, Debug)]
struct Kind {
    group: String,
    /// Served versions, preferred first.
    versions: Vec<String>,
    kind: String,
    plural: String,
    namespaced: bool,
    /// Discovery lists a `{plural}/status` subresource.
    status: bool,
    /// A custom resource: list items keep their `apiVersion` and `kind`
    /// (real servers leave them out for built-in kinds).
    custom: bool,
}

impl Kind {
    fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    fn serves(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }

    /// How messages name the resource: `configmaps`, `deployments.apps`.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn key(&self, ns: Option<&str>, name: &str) -> Key {
        let ns = if self.namespaced {
            ns.map(str::to_string)
        } else {
            None
        };
        (
            self.group.clone(),
            self.plural.clone(),
            ns,
            name.to_string(),
        )
    }
}

/// The built-in kinds: group (`-` for core), versions (preferred first),
/// kind, plural, scope, and whether discovery lists a `/status` subresource.
const BUILTIN: &[&str] = &[
    "-                         v1    Namespace               namespaces               cluster    status",
    "-                         v1    ConfigMap               configmaps               namespaced -",
    "-                         v1    Secret                  secrets                  namespaced -",
    "-                         v1    Service                 services                 namespaced status",
    "-                         v1    ServiceAccount          serviceaccounts          namespaced -",
    "apps                      v1    Deployment              deployments              namespaced status",
    "apps                      v1    StatefulSet             statefulsets             namespaced status",
    "apps                      v1    DaemonSet               daemonsets               namespaced status",
    "autoscaling               v2,v1 HorizontalPodAutoscaler horizontalpodautoscalers namespaced status",
    "networking.k8s.io         v1    Ingress                 ingresses                namespaced status",
    "networking.k8s.io         v1    NetworkPolicy           networkpolicies          namespaced -",
    "networking.k8s.io         v1    IngressClass            ingressclasses           cluster    -",
    "rbac.authorization.k8s.io v1    ClusterRole             clusterroles             cluster    -",
    "rbac.authorization.k8s.io v1    Role                    roles                    namespaced -",
    "apiextensions.k8s.io      v1    CustomResourceDefinition customresourcedefinitions cluster   status",
];

fn builtin_kinds() -> Vec<Kind> {
    BUILTIN
        .iter()
        .map(|row| {
            let f: Vec<&str> = row.split_whitespace().collect();
            Kind {
                group: f[0].trim_start_matches('-').into(),
                versions: f[1].split(',').map(str::to_string).collect(),
                kind: f[2].into(),
                plural: f[3].into(),
                namespaced: f[4] == "namespaced",
                status: f[5] == "status",
                custom: false,
            }
        })
        .collect()
}

/// A status code and a JSON body.
type Reply = (u16, Value);

/// Group, plural, namespace (none for cluster-scoped kinds), name.
type Key = (String, String, Option<String>, String);

struct Stored {
    obj: Value,
    /// Per Apply manager: the fields it owns, as the body it applied last
    /// (without apiVersion, kind, name, namespace) minus what others changed.
    owned: BTreeMap<String, Value>,
}

/// A write, as watches see it: each watch decides from `before` and `after`
/// whether it is ADDED, MODIFIED or DELETED for its selector.
#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    group: String,
    plural: String,
    ns: Option<String>,
    before: Option<Value>,
    after: Value,
    gone: bool,
}

struct Refusal {
    method: String,
    path_contains: String,
    code: u16,
    reason: String,
    message: String,
}

struct State {
    kinds: Vec<Kind>,
    objects: BTreeMap<Key, Stored>,
    /// The last resourceVersion handed out.
    rv: u64,
    uids: u64,
    history: Vec<Event>,
    events: broadcast::Sender<Event>,
    seen: Vec<Seen>,
    refusals: Vec<Refusal>,
}

/// The request's target once the path is parsed.
struct Target {
    kind: Kind,
    version: String,
    ns: Option<String>,
    name: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ApiServer {
    /// Starts serving on `127.0.0.1` on a free port.
    pub async fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, _) = broadcast::channel(4096);
        let state = State {
            kinds: builtin_kinds(),
            objects: BTreeMap::new(),
            rv: 0,
            uids: 0,
            history: Vec::new(),
            events,
            seen: Vec::new(),
            refusals: Vec::new(),
        };
        let server = ApiServer {
            state: Arc::new(Mutex::new(state)),
            addr,
            running: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    /// `http://127.0.0.1:PORT`, the same across `stop` and `resume`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&self, listener: TcpListener) {
        let (stop, stopped) = watch::channel(false);
        let state = self.state.clone();
        let mut on_stop = stopped.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                std::future::ready(handle(&state, &stopped, &method, &uri, &headers, &body))
            },
        );
        let task = tokio::spawn(async move {
            // `changed` also returns when the sender is dropped.
            let shutdown =
                async move { while on_stop.changed().await.is_ok() && !*on_stop.borrow() {} };
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .unwrap();
        });
        *lock(&self.running) = Some(Running { stop, task });
    }

    /// Stops listening, ends every watch and closes every connection, so
    /// clients see the connection refused. The state is kept.
    pub async fn stop(&self) {
        let running = lock(&self.running).take();
        if let Some(r) = running {
            let _ = r.stop.send(true);
            tokio::time::timeout(Duration::from_secs(10), r.task)
                .await
                .expect("the stand-in API server did not stop within 10 s")
                .unwrap();
        }
    }

    /// Listens again on the same port, with the same objects, counter and
    /// history. Does nothing when already running.
    pub async fn resume(&self) {
        let running = lock(&self.running).is_some();
        if !running {
            let listener = TcpListener::bind(self.addr)
                .await
                .unwrap_or_else(|e| panic!("rebind {}: {e}", self.addr));
            self.serve(listener);
        }
    }

    /// Registers a custom resource (as installing its CRD would); a second
    /// version of a known one is added to it.
    pub fn add_crd(&self, group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) {
        let mut st = lock(&self.state);
        if let Some(k) = st
            .kinds
            .iter_mut()
            .find(|k| k.group == group && k.plural == plural)
        {
            if !k.serves(version) {
                k.versions.push(version.into());
            }
            return;
        }
        st.kinds.push(Kind {
            group: group.into(),
            versions: vec![version.into()],
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            status: false,
            custom: true,
        });
    }

    /// Every request so far, in arrival order (watches included).
    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state).seen.clear();
    }

    /// Requests with this method (any with `*`) whose path contains
    /// `path_contains` (or, when it ends with `$`, ends with the rest).
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        let st = lock(&self.state);
        st.seen
            .iter()
            .filter(|s| method_is(method, &s.method) && path_is(path_contains, &s.path))
            .count()
    }

    /// From now on answers requests with this method (any with `*`) whose
    /// path contains `path_contains` (ends with it, when it ends with `$`:
    /// `/api/v1/namespaces/x$` is the namespace, not what is in it) with a
    /// `Status` of `code`, until
    /// [`ApiServer::allow_all`].
    pub fn refuse(
        &self,
        method: &str,
        path_contains: &str,
        code: u16,
        reason: &str,
        message: &str,
    ) {
        lock(&self.state).refusals.push(Refusal {
            method: method.into(),
            path_contains: path_contains.into(),
            code,
            reason: reason.into(),
            message: message.into(),
        });
    }

    pub fn allow_all(&self) {
        lock(&self.state).refusals.clear();
    }

    /// Creates or replaces an object as `kubectl` would (an Update by the
    /// manager `kubectl`; Apply managers of a replaced object are forgotten).
    /// Keeps `status` if given. Returns the stored object.
    pub fn put(&self, obj: Value) -> Value {
        let mut st = lock(&self.state);
        let av = obj["apiVersion"]
            .as_str()
            .expect("put: apiVersion")
            .to_string();
        let kind = st.kind_of(&av, obj["kind"].as_str().expect("put: kind"));
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("put: metadata.name");
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
        let key = kind.key(Some(ns), name);
        let mut obj = obj.clone();
        strip_server_fields(&mut obj, true);
        let fields = fields_v1(&owned_part(&obj));
        set_entry(&mut obj, "kubectl", "Update", &av, fields);
        st.write(&kind, key, obj, BTreeMap::new())
    }

    /// The stored object, with `apiVersion` as asked.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let st = lock(&self.state);
        let kind = st.kind_of(api_version, kind);
        let version = api_version.rsplit('/').next().unwrap_or(api_version);
        st.objects
            .get(&kind.key(ns, name))
            .map(|s| present(&s.obj, &kind, version))
    }

    /// A write by `kubectl-edit` (operation Update): applies `f` to the
    /// object; every Apply manager loses the fields whose values changed.
    /// Panics if there is no such object.
    pub fn edit_by_hand(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Value {
        let mut st = lock(&self.state);
        let kind = st.kind_of(api_version, kind);
        let key = kind.key(ns, name);
        let stored = st
            .objects
            .get(&key)
            .unwrap_or_else(|| panic!("edit_by_hand: no {key:?}"));
        let old = stored.obj.clone();
        let mut owned = stored.owned.clone();
        let mut edited = old.clone();
        f(&mut edited);
        let mut new = edited.clone();
        for (manager, fields) in &mut owned {
            drop_changed(fields, &old, &edited);
            set_fields(&mut new, manager, fields_v1(fields));
        }
        set_entry(
            &mut new,
            "kubectl-edit",
            "Update",
            api_version,
            fields_v1(&changed(&old, &edited)),
        );
        st.write(&kind, key, new, owned)
    }

    /// Replaces `.status` as a controller would; managedFields stay as they
    /// are. Panics if there is no such object.
    pub fn set_status(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        status: Value,
    ) -> Value {
        let mut st = lock(&self.state);
        let kind = st.kind_of(api_version, kind);
        let key = kind.key(ns, name);
        let stored = st
            .objects
            .get(&key)
            .unwrap_or_else(|| panic!("set_status: no {key:?}"));
        let (mut obj, owned) = (stored.obj.clone(), stored.owned.clone());
        obj["status"] = status;
        st.write(&kind, key, obj, owned)
    }

    /// Deletes as `kubectl delete` would (a namespace takes its objects
    /// along). Returns whether it was there.
    pub fn delete_by_hand(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> bool {
        let mut st = lock(&self.state);
        let kind = st.kind_of(api_version, kind);
        st.remove(&kind, kind.key(ns, name)).is_some()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.running).take() {
            let _ = r.stop.send(true);
        }
    }
}

fn method_is(pattern: &str, method: &str) -> bool {
    pattern == "*" || pattern.eq_ignore_ascii_case(method)
}

/// `pattern` is in `path`; a trailing `$` anchors it at the end.
fn path_is(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('$') {
        Some(end) => path.ends_with(end),
        None => path.contains(pattern),
    }
}

/// Answers one request. Synchronous: the state lock is never held across an
/// await; a watch returns a body that streams on its own.
fn handle(
    state: &Mutex<State>,
    stop: &watch::Receiver<bool>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let seen = Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
    };
    let mut st = lock(state);
    st.seen.push(seen.clone());
    if let Some(r) = st
        .refusals
        .iter()
        .find(|r| method_is(&r.method, &seen.method) && path_is(&r.path_contains, &seen.path))
    {
        let (code, body) = fail(r.code, &r.reason, &r.message);
        return reply(code, &body);
    }
    let q = params(&seen.query);
    let segs: Vec<&str> = seen.path.split('/').filter(|s| !s.is_empty()).collect();
    let (code, value) = match segs.as_slice() {
        ["api"] => (
            200,
            json!({"kind": "APIVersions", "versions": ["v1"],
                   "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": uri.authority().map(|a| a.to_string()).unwrap_or_default()}]}),
        ),
        ["apis"] => (
            200,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": st.groups()}),
        ),
        ["apis", group] => match st.groups().into_iter().find(|g| g["name"] == *group) {
            Some(mut g) => {
                g["kind"] = "APIGroup".into();
                g["apiVersion"] = "v1".into();
                (200, g)
            }
            None => (404, not_served()),
        },
        ["api", version] => st.resources("", version),
        ["apis", group, version] => st.resources(group, version),
        _ => match st.route(&segs) {
            None => (404, not_served()),
            Some(t) => match (seen.method.as_str(), t.name.as_deref()) {
                ("GET", Some(name)) => st.get_one(&t, name),
                ("GET", None)
                    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) =>
                {
                    return st.watch(&t, &q, stop.clone());
                }
                ("GET", None) => st.list(&t, &q),
                ("POST", None) if t.ns.is_some() || !t.kind.namespaced => {
                    st.create(&t, &q, &seen.body)
                }
                ("PATCH", Some(name)) => st.apply(&t, name, &q, &seen.content_type, &seen.body),
                ("DELETE", Some(name)) => st.delete(&t, name, &seen.body),
                _ => fail(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                ),
            },
        },
    };
    reply(code, &value)
}

impl State {
    /// The kind for an `apiVersion` and `kind` a test names; panics on an
    /// unknown one (a mistake in the test).
    fn kind_of(&self, api_version: &str, kind: &str) -> Kind {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.kinds
            .iter()
            .find(|k| k.group == group && k.kind == kind && k.serves(version))
            .unwrap_or_else(|| panic!("the stand-in serves no {kind} in {api_version}"))
            .clone()
    }

    /// The groups for `/apis`, in the order of the kinds table.
    fn groups(&self) -> Vec<Value> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for k in self.kinds.iter().filter(|k| !k.group.is_empty()) {
            let i = match groups.iter().position(|(g, _)| *g == k.group) {
                Some(i) => i,
                None => {
                    groups.push((k.group.clone(), Vec::new()));
                    groups.len() - 1
                }
            };
            for v in &k.versions {
                if !groups[i].1.contains(v) {
                    groups[i].1.push(v.clone());
                }
            }
        }
        let gv = |g: &str, v: &str| json!({"groupVersion": format!("{g}/{v}"), "version": v});
        groups
            .iter()
            .map(|(g, vs)| {
                json!({"name": g, "versions": vs.iter().map(|v| gv(g, v)).collect::<Vec<_>>(),
                       "preferredVersion": gv(g, &vs[0])})
            })
            .collect()
    }

    /// The APIResourceList of one group version.
    fn resources(&self, group: &str, version: &str) -> Reply {
        let mut resources = Vec::new();
        for k in self
            .kinds
            .iter()
            .filter(|k| k.group == group && k.serves(version))
        {
            resources.push(json!({"name": k.plural, "singularName": k.kind.to_lowercase(),
                "namespaced": k.namespaced, "kind": k.kind,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]}));
            if k.status {
                resources.push(json!({"name": format!("{}/status", k.plural), "singularName": "",
                    "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"]}));
            }
        }
        if resources.is_empty() {
            return (404, not_served());
        }
        let group_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        (
            200,
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
        )
    }

    /// Parses a resource path; `None` for anything not served.
    fn route(&self, segs: &[&str]) -> Option<Target> {
        let (group, version, rest) = match segs {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let (ns, plural, name) = match rest {
            ["namespaces", ns, plural] => (Some(*ns), *plural, None),
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
            [plural] => (None, *plural, None),
            [plural, name] => (None, *plural, Some(*name)),
            _ => return None,
        };
        let kind = self
            .kinds
            .iter()
            .find(|k| k.group == group && k.plural == plural && k.serves(version))?;
        match (kind.namespaced, ns.is_some(), name.is_some()) {
            // A cluster-scoped kind under a namespace, or one namespaced
            // object without its namespace: not a path real servers serve.
            (false, true, _) | (true, false, true) => None,
            _ => Some(Target {
                kind: kind.clone(),
                version: version.to_string(),
                ns: ns.map(str::to_string),
                name: name.map(str::to_string),
            }),
        }
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.objects
            .contains_key(&(String::new(), "namespaces".into(), None, ns.to_string()))
    }

    fn get_one(&self, t: &Target, name: &str) -> Reply {
        match self.objects.get(&t.kind.key(t.ns.as_deref(), name)) {
            Some(s) => (200, present(&s.obj, &t.kind, &t.version)),
            None => (404, not_found(&t.kind, name)),
        }
    }

    fn list(&self, t: &Target, q: &BTreeMap<String, String>) -> Reply {
        let selector = q.get("labelSelector").map(String::as_str).unwrap_or("");
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, s)| in_scope(t, &k.0, &k.1, &k.2) && selected(selector, &s.obj))
            .map(|(_, s)| {
                let mut item = present(&s.obj, &t.kind, &t.version);
                if !t.kind.custom {
                    let m = item.as_object_mut().unwrap();
                    m.remove("apiVersion");
                    m.remove("kind");
                }
                item
            })
            .collect();
        (
            200,
            json!({"kind": format!("{}List", t.kind.kind), "apiVersion": t.kind.api_version(&t.version),
                   "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}),
        )
    }

    /// Answers a watch: the events after `resourceVersion` (or the current
    /// objects as ADDED when it is absent or "0"), then live events, until
    /// `timeoutSeconds` or the server stops.
    fn watch(
        &self,
        t: &Target,
        q: &BTreeMap<String, String>,
        stop: watch::Receiver<bool>,
    ) -> Response {
        let filter = Filter {
            kind: t.kind.clone(),
            version: t.version.clone(),
            ns: t.ns.clone(),
            selector: q.get("labelSelector").cloned().unwrap_or_default(),
        };
        // Subscribing under the state lock: no event is missed or doubled
        // between the replay and the live part.
        let rx = self.events.subscribe();
        let since = q
            .get("resourceVersion")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let backlog: VecDeque<Bytes> = if since == 0 {
            self.objects
                .iter()
                .filter(|(k, s)| {
                    in_scope(t, &k.0, &k.1, &k.2) && selected(&filter.selector, &s.obj)
                })
                .map(|(_, s)| filter.frame("ADDED", &s.obj))
                .collect()
        } else {
            self.history
                .iter()
                .filter(|e| e.rv > since)
                .filter_map(|e| filter.line(e))
                .collect()
        };
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1800);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let live = Live {
            backlog,
            rx,
            stop,
            filter,
            deadline,
        };
        let stream = futures::stream::unfold(live, |mut live| async move {
            let line = live.next().await?;
            Some((Ok::<_, Infallible>(line), live))
        });
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap()
    }

    fn create(&mut self, t: &Target, q: &BTreeMap<String, String>, body: &Value) -> Reply {
        let Some(name) = body["metadata"]["name"].as_str() else {
            let msg = format!(
                "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                t.kind.kind
            );
            return fail(422, "Invalid", &msg);
        };
        if let Some(ns) = &t.ns
            && !self.namespace_exists(ns)
        {
            return (404, namespace_not_found(ns));
        }
        let key = t.kind.key(t.ns.as_deref(), name);
        if self.objects.contains_key(&key) {
            let msg = format!("{} \"{name}\" already exists", t.kind.qualified());
            let mut s = status(409, "AlreadyExists", &msg);
            s["details"] = details(&t.kind, name);
            return (409, s);
        }
        let mut obj = body.clone();
        strip_server_fields(&mut obj, false);
        let av = t.kind.api_version(&t.version);
        obj["apiVersion"] = av.clone().into();
        let manager = q
            .get("fieldManager")
            .map(String::as_str)
            .unwrap_or("unknown");
        let fields = fields_v1(&owned_part(&obj));
        set_entry(&mut obj, manager, "Update", &av, fields);
        let stored = self.write(&t.kind, key, obj, BTreeMap::new());
        (201, present(&stored, &t.kind, &t.version))
    }

    /// Server-side apply.
    fn apply(
        &mut self,
        t: &Target,
        name: &str,
        q: &BTreeMap<String, String>,
        ct: &str,
        body: &Value,
    ) -> Reply {
        let kind = &t.kind;
        let av = kind.api_version(&t.version);
        if !ct.starts_with("application/apply-patch") {
            let msg = format!(
                "the stand-in accepts only application/apply-patch+yaml patches, not {ct:?}"
            );
            return fail(415, "UnsupportedMediaType", &msg);
        }
        let Some(manager) = q.get("fieldManager") else {
            return fail(
                400,
                "BadRequest",
                "fieldManager is required for apply requests",
            );
        };
        if !body.is_object() {
            return fail(
                400,
                "BadRequest",
                "error decoding YAML: the body is not an object",
            );
        }
        if body["kind"] != kind.kind.as_str() || body["apiVersion"] != av.as_str() {
            let msg = format!(
                "{} in version {:?} cannot be handled as a {}: the body is {} {}",
                kind.kind, t.version, kind.kind, body["apiVersion"], body["kind"]
            );
            return fail(400, "BadRequest", &msg);
        }
        if let Some(n) = body["metadata"]["name"].as_str()
            && n != name
        {
            let msg =
                format!("the name of the object ({n}) does not match the name on the URL ({name})");
            return fail(400, "BadRequest", &msg);
        }
        let mut unknown = Vec::new();
        unknown_fields(body, "", "", &mut unknown);
        if let Some((_, typed)) = unknown.first() {
            return if q.get("fieldValidation").is_some_and(|v| v == "Strict") {
                let fields: Vec<String> = unknown
                    .iter()
                    .map(|(s, _)| format!("unknown field {s:?}"))
                    .collect();
                let msg = format!(
                    "{k} in version {:?} cannot be handled as a {k}: strict decoding error: {}",
                    t.version,
                    fields.join(", "),
                    k = kind.kind
                );
                fail(400, "BadRequest", &msg)
            } else {
                let msg = format!(
                    "failed to create typed patch object ({}/{name}; {av}, Kind={}): {typed}: field not declared in schema",
                    t.ns.as_deref().unwrap_or(""),
                    kind.kind
                );
                fail(500, "", &msg)
            };
        }
        if let Some(ns) = &t.ns
            && !self.namespace_exists(ns)
        {
            return (404, namespace_not_found(ns));
        }
        let key = kind.key(t.ns.as_deref(), name);
        let old = self.objects.get(&key);
        // A UID in the applied object is a precondition on an existing one
        // (a create ignores it and makes a new UID), as on real servers.
        if let (Some(want), Some(old)) = (body["metadata"]["uid"].as_str(), old)
            && Some(want) != old.obj["metadata"]["uid"].as_str()
        {
            let msg = format!(
                "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in \
                 precondition: {want}, UID in object meta: {}",
                kind.plural,
                old.obj["metadata"]["uid"].as_str().unwrap_or("")
            );
            let mut st = status(409, "Conflict", &msg);
            st["details"] = details(kind, name);
            return (409, st);
        }
        let (mut obj, mut owned) = old
            .map(|s| (s.obj.clone(), s.owned.clone()))
            .unwrap_or_default();
        let created = old.is_none();
        let mut applied = body.clone();
        if let Some(m) = applied.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("uid");
        }
        strip_server_fields(&mut applied, false);
        merge(&mut obj, &applied, owned.get(manager));
        let mine = owned_part(&applied);
        set_entry(&mut obj, manager, "Apply", &av, fields_v1(&mine));
        owned.insert(manager.clone(), mine);
        if let Some(old) = old
            && old.obj == obj
        {
            // Nothing changed: no write, no event, no new resourceVersion.
            return (200, present(&obj, kind, &t.version));
        }
        let stored = self.write(kind, key, obj, owned);
        (
            if created { 201 } else { 200 },
            present(&stored, kind, &t.version),
        )
    }

    fn delete(&mut self, t: &Target, name: &str, body: &Value) -> Reply {
        let key = t.kind.key(t.ns.as_deref(), name);
        let Some(stored) = self.objects.get(&key) else {
            return (404, not_found(&t.kind, name));
        };
        let meta = &stored.obj["metadata"];
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = body["preconditions"][field].as_str()
                && Some(want) != meta[field].as_str()
            {
                let msg = format!(
                    "Precondition failed: {label} in precondition: {want}, {label} in object meta: {}",
                    meta[field].as_str().unwrap_or("")
                );
                let mut s = status(409, "Conflict", &msg);
                s["details"] = details(&t.kind, name);
                return (409, s);
            }
        }
        let gone = self.remove(&t.kind, key).unwrap();
        (200, present(&gone, &t.kind, &t.version))
    }

    /// Stores `obj` under `key`: keeps `uid` and `creationTimestamp`, bumps
    /// `resourceVersion` (and `generation` when `spec` changed), records and
    /// broadcasts the event. Returns the stored object.
    fn write(
        &mut self,
        kind: &Kind,
        key: Key,
        mut obj: Value,
        owned: BTreeMap<String, Value>,
    ) -> Value {
        let before = self.objects.get(&key).map(|s| s.obj.clone());
        self.rv += 1;
        if !obj["apiVersion"].is_string() {
            obj["apiVersion"] = kind.api_version(&kind.versions[0]).into();
        }
        obj["kind"] = kind.kind.clone().into();
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let old_meta = before
            .as_ref()
            .map(|b| b["metadata"].clone())
            .unwrap_or(Value::Null);
        let uid = match old_meta["uid"].as_str() {
            Some(uid) => uid.to_string(),
            None => {
                self.uids += 1;
                format!("5a0a1000-0000-4000-8000-{:012x}", self.uids)
            }
        };
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.insert("name".into(), key.3.clone().into());
        match &key.2 {
            Some(ns) => meta.insert("namespace".into(), ns.clone().into()),
            None => meta.remove("namespace"),
        };
        meta.insert("uid".into(), uid.into());
        meta.insert("resourceVersion".into(), self.rv.to_string().into());
        let created = old_meta["creationTimestamp"]
            .as_str()
            .map_or_else(now, str::to_string);
        meta.insert("creationTimestamp".into(), created.into());
        if obj.get("spec").is_some() {
            let generation = match (old_meta["generation"].as_u64(), &before) {
                (Some(g), Some(b)) if b.get("spec") == obj.get("spec") => g,
                (Some(g), _) => g + 1,
                (None, _) => 1,
            };
            obj["metadata"]["generation"] = generation.into();
        }
        self.record(&key, before, obj.clone(), false);
        self.objects.insert(
            key,
            Stored {
                obj: obj.clone(),
                owned,
            },
        );
        obj
    }

    /// Removes an object (a namespace with every object in it), emitting
    /// DELETED for each. Returns the removed object.
    fn remove(&mut self, kind: &Kind, key: Key) -> Option<Value> {
        if kind.group.is_empty() && kind.plural == "namespaces" {
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| k.2.as_deref() == Some(&key.3))
                .cloned()
                .collect();
            for k in inside {
                let stored = self.objects.remove(&k).unwrap();
                self.forget(&k, stored.obj);
            }
        }
        let stored = self.objects.remove(&key)?;
        Some(self.forget(&key, stored.obj))
    }

    fn forget(&mut self, key: &Key, obj: Value) -> Value {
        self.rv += 1;
        let mut after = obj.clone();
        after["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.record(key, Some(obj), after.clone(), true);
        after
    }

    fn record(&mut self, key: &Key, before: Option<Value>, after: Value, gone: bool) {
        let (group, plural, ns, _) = key.clone();
        let event = Event {
            rv: self.rv,
            group,
            plural,
            ns,
            before,
            after,
            gone,
        };
        self.history.push(event.clone());
        // No receivers is fine: nobody watches.
        let _ = self.events.send(event);
    }
}

fn in_scope(t: &Target, group: &str, plural: &str, ns: &Option<String>) -> bool {
    group == t.kind.group && plural == t.kind.plural && (t.ns.is_none() || *ns == t.ns)
}

/// What one watch wants, and how it words events.
struct Filter {
    kind: Kind,
    version: String,
    ns: Option<String>,
    selector: String,
}

impl Filter {
    /// The event's line for this watch, if it concerns it. An object that
    /// starts matching is ADDED, one that stops matching is DELETED.
    fn line(&self, e: &Event) -> Option<Bytes> {
        if e.group != self.kind.group
            || e.plural != self.kind.plural
            || (self.ns.is_some() && e.ns != self.ns)
        {
            return None;
        }
        let was = e
            .before
            .as_ref()
            .is_some_and(|b| selected(&self.selector, b));
        let is = !e.gone && selected(&self.selector, &e.after);
        let ty = match (was, is) {
            (true, true) => "MODIFIED",
            (false, true) => "ADDED",
            (true, false) => "DELETED",
            (false, false) => return None,
        };
        Some(self.frame(ty, &e.after))
    }

    fn frame(&self, ty: &str, obj: &Value) -> Bytes {
        let line = json!({"type": ty, "object": present(obj, &self.kind, &self.version)});
        Bytes::from(format!("{line}\n"))
    }
}

/// One open watch: its replay, then live events until it times out or the
/// server stops.
struct Live {
    backlog: VecDeque<Bytes>,
    rx: broadcast::Receiver<Event>,
    stop: watch::Receiver<bool>,
    filter: Filter,
    deadline: tokio::time::Instant,
}

impl Live {
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(line) = self.backlog.pop_front() {
            return Some(line);
        }
        loop {
            if *self.stop.borrow() {
                return None;
            }
            tokio::select! {
                // An error: the server's run is over.
                changed = self.stop.changed() => if changed.is_err() { return None },
                () = tokio::time::sleep_until(self.deadline) => return None,
                event = self.rx.recv() => match event {
                    Ok(e) => if let Some(line) = self.filter.line(&e) { return Some(line) },
                    // Lagged or closed: end it, the client watches again.
                    Err(_) => return None,
                },
            }
        }
    }
}

/// Whether `obj`'s labels satisfy a selector of comma-separated `k=v`,
/// `k==v`, `k!=v`, `k` and `!k` terms (an empty selector selects all).
fn selected(selector: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    let label = |k: &str| labels[k.trim()].as_str();
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                label(k) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                label(k) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                label(k).is_none()
            } else {
                label(term).is_some()
            }
        })
}

/// The object as served for `version` of its kind.
fn present(obj: &Value, kind: &Kind, version: &str) -> Value {
    let mut obj = obj.clone();
    obj["apiVersion"] = kind.api_version(version).into();
    obj["kind"] = kind.kind.clone().into();
    obj
}

/// Removes what clients may send but the server owns (and `status`,
/// which only the status subresource writes, unless `keep_status`).
fn strip_server_fields(obj: &mut Value, keep_status: bool) {
    if !keep_status && let Some(m) = obj.as_object_mut() {
        m.remove("status");
    }
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for f in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "generation",
            "managedFields",
        ] {
            meta.remove(f);
        }
    }
}

/// The part of a body a manager owns: all but apiVersion, kind and the
/// object's name and namespace.
fn owned_part(body: &Value) -> Value {
    let mut owned = body.clone();
    if let Some(m) = owned.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("name");
            meta.remove("namespace");
            if meta.is_empty() {
                m.remove("metadata");
            }
        }
    }
    owned
}

/// Merges `applied` into `stored`: maps recursively, anything else
/// replaced. Keys of `previous` (what the same manager applied last time)
/// that `applied` leaves out are removed.
fn merge(stored: &mut Value, applied: &Value, previous: Option<&Value>) {
    let (Some(s), Some(a)) = (stored.as_object_mut(), applied.as_object()) else {
        *stored = applied.clone();
        return;
    };
    if let Some(prev) = previous.and_then(Value::as_object) {
        for k in prev.keys().filter(|k| !a.contains_key(*k)) {
            s.remove(k);
        }
    }
    for (k, v) in a {
        match s.get_mut(k) {
            Some(sv) if sv.is_object() && v.is_object() => {
                merge(sv, v, previous.and_then(|p| p.get(k)))
            }
            _ => {
                s.insert(k.clone(), v.clone());
            }
        }
    }
}

/// `fieldsV1` for what a manager owns: `f:` per map key, `k:{"name":..}`
/// per list item with a name, any other value a leaf (`{}`).
fn fields_v1(owned: &Value) -> Value {
    match owned {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (format!("f:{k}"), fields_v1(v)))
                .collect(),
        ),
        Value::Array(items) if !items.is_empty() && items.iter().all(|i| i["name"].is_string()) => {
            Value::Object(
                items
                    .iter()
                    .map(|i| (format!("k:{}", json!({"name": i["name"]})), fields_v1(i)))
                    .collect(),
            )
        }
        _ => json!({}),
    }
}

/// Drops from `owned` every leaf whose value differs between `old` and
/// `new` (another writer took it over); maps left empty go too.
fn drop_changed(owned: &mut Value, old: &Value, new: &Value) {
    let Some(m) = owned.as_object_mut() else {
        return;
    };
    m.retain(|k, v| {
        let (o, n) = (old.get(k), new.get(k));
        if o == n {
            return true;
        }
        let nonempty_map = v.as_object().is_some_and(|m| !m.is_empty());
        match (o, n) {
            (Some(o), Some(n)) if nonempty_map && o.is_object() && n.is_object() => {
                drop_changed(v, o, n);
                v.as_object().is_some_and(|m| !m.is_empty())
            }
            _ => false,
        }
    });
}

/// What `new` sets differently from `old` (maps recursively).
fn changed(old: &Value, new: &Value) -> Value {
    match (old.as_object(), new.as_object()) {
        (Some(o), Some(n)) => Value::Object(
            n.iter()
                .filter(|(k, v)| o.get(*k) != Some(*v))
                .map(|(k, v)| {
                    (
                        k.clone(),
                        o.get(k).map_or_else(|| v.clone(), |ov| changed(ov, v)),
                    )
                })
                .collect(),
        ),
        _ => new.clone(),
    }
}

/// Sets the managedFields entry of (manager, operation), keeping the
/// entry's time when its fields and apiVersion are the same.
fn set_entry(obj: &mut Value, manager: &str, operation: &str, api_version: &str, fields: Value) {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    let entries = obj["metadata"]
        .as_object_mut()
        .unwrap()
        .entry("managedFields")
        .or_insert_with(|| json!([]));
    let Some(list) = entries.as_array_mut() else {
        return;
    };
    let pos = list
        .iter()
        .position(|e| e["manager"] == manager && e["operation"] == operation);
    if let Some(i) = pos
        && list[i]["fieldsV1"] == fields
        && list[i]["apiVersion"] == api_version
    {
        return;
    }
    let entry = json!({"manager": manager, "operation": operation, "apiVersion": api_version,
                       "time": now(), "fieldsType": "FieldsV1", "fieldsV1": fields});
    match pos {
        Some(i) => list[i] = entry,
        None => list.push(entry),
    }
}

/// Replaces the `fieldsV1` of `manager`'s Apply entry.
fn set_fields(obj: &mut Value, manager: &str, fields: Value) {
    if let Some(list) = obj["metadata"]["managedFields"].as_array_mut()
        && let Some(e) = list
            .iter_mut()
            .find(|e| e["manager"] == manager && e["operation"] == "Apply")
    {
        e["fieldsV1"] = fields;
    }
}

/// Keys the stand-in treats as not in the schema, as (strict-decoding
/// path, typed-patch path): `spec.x[0].bogusY` and `.spec.x[name="web"].bogusY`.
fn unknown_fields(v: &Value, strict: &str, typed: &str, out: &mut Vec<(String, String)>) {
    const FREE_FORM: [&str; 7] = [
        "labels",
        "annotations",
        "data",
        "stringData",
        "binaryData",
        "matchLabels",
        "nodeSelector",
    ];
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let s = if strict.is_empty() {
                    k.clone()
                } else {
                    format!("{strict}.{k}")
                };
                let t = format!("{typed}.{k}");
                if k == "imagePulPolicy" || k.starts_with("bogus") {
                    out.push((s, t));
                } else if !FREE_FORM.contains(&k.as_str()) {
                    unknown_fields(v, &s, &t, out);
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let key = item["name"]
                    .as_str()
                    .map_or_else(|| i.to_string(), |n| format!("name={n:?}"));
                unknown_fields(
                    item,
                    &format!("{strict}[{i}]"),
                    &format!("{typed}[{key}]"),
                    out,
                );
            }
        }
        _ => {}
    }
}

fn fail(code: u16, reason: &str, message: &str) -> Reply {
    (code, status(code, reason, message))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn details(kind: &Kind, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": kind.plural});
    if !kind.group.is_empty() {
        d["group"] = kind.group.clone().into();
    }
    d
}

fn not_found(kind: &Kind, name: &str) -> Value {
    let mut s = status(
        404,
        "NotFound",
        &format!("{} {name:?} not found", kind.qualified()),
    );
    s["details"] = details(kind, name);
    s
}

fn namespace_not_found(ns: &str) -> Value {
    let mut s = status(404, "NotFound", &format!("namespaces {ns:?} not found"));
    s["details"] = json!({"name": ns, "kind": "namespaces"});
    s
}

fn not_served() -> Value {
    let mut s = status(
        404,
        "NotFound",
        "the server could not find the requested resource",
    );
    s["details"] = json!({});
    s
}

fn reply(code: u16, v: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

/// The query's parameters, URL-decoded.
fn params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (b[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Now, as a timestamp in API objects.
fn now() -> String {
    node::runtime::kube::utc(SystemTime::now())
}
