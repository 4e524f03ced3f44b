//! The operator HTTP API and the web UI, served by `shoal anchor run --http`.
//!
//! Reads are answered from the latest [`Snapshot`] (a `watch` channel the
//! daemon publishes to), so a page of 10,000 nodes never waits for the
//! daemon's loop. Writes become [`Command`]s that the daemon carries out
//! with the data dir's operator identity, the requesting operator's name
//! recorded in the change. Every endpoint but `/healthz`, `/readyz`,
//! `/api/login` and the UI's static files needs an operator token, as
//! `Authorization: Bearer <token>` or the session cookie `/api/login` sets
//! (HttpOnly, SameSite=Strict). The routes are described in
//! `/api/openapi.json` (kept in `openapi.json`; a test checks it lists
//! every route in [`ROUTES`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::Instrument;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use crdt_state::fleet::manifest;
use crdt_state::fleet::model::Kind;
use daemon::command::{Answer, Caller, Command, Incoming, Refusal};
use daemon::render::{self, Format};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use crate::tokens::{ApiRole, TokenEntry, Tokens};
use crate::view::{NodeState, Snapshot};

/// A failed request: a command's [`Refusal`] (status and words naming what
/// was wrong, the manifest file, document and field at fault), answered as
/// JSON in the one error shape the OpenAPI document gives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiError(pub Refusal);

impl ApiError {
    /// An error with a status.
    pub fn new(status: u16, error: impl Into<String>) -> ApiError {
        ApiError(Refusal::new(status, error))
    }
}

impl std::ops::Deref for ApiError {
    type Target = Refusal;
    fn deref(&self) -> &Refusal {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut Refusal {
        &mut self.0
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        ApiError(r)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

/// What the demo lets the UI do (only `shoal demo` provides it).
pub trait Demo: Send + Sync {
    /// Sites (and whether each is cut off) and the sample app on each node.
    fn status(&self) -> Value;
    /// Cuts a site's link to the anchor (`true`) or restores it.
    fn set_cut(&self, site: &str, cut: bool) -> Result<(), String>;
    /// A field engineer's edit at a site, through a node's site API:
    /// sets `key` of config `config` in the site's overrides.
    fn site_edit(&self, site: &str, config: &str, key: &str, value: &str) -> Result<(), String>;
}

/// Everything the handlers need.
pub struct Server {
    /// Snapshots from the daemon.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Commands to the daemon (its one command surface).
    pub commands: mpsc::Sender<Incoming>,
    /// Operator tokens.
    pub tokens: Tokens,
    /// Demo controls.
    pub demo: Option<Arc<dyn Demo>>,
    /// The anchor's blob store (artifacts uploaded through the API).
    pub blobs: Option<Arc<blobs::BlobStore>>,
    /// The anchor's store (the data that came up from the nodes).
    pub store: Option<Arc<crdt_state::Store>>,
    /// What came up on `/shoal/data/1`.
    pub data: Option<Arc<daemon::data_up::Counters>>,
    /// The exporter to PostgreSQL, when there is one.
    pub export: Option<Arc<crate::export::Stats>>,
    /// Failed logins per client address.
    pub throttle: Throttle,
}

/// How many failed logins (a wrong, expired or revoked token, at
/// `/api/login` or on any route) one client address may make in a minute;
/// past that its wrong tokens get 429, with no security event each, until
/// the minute is over. A valid token still passes: operators behind one
/// proxy or NAT are not locked out by one misconfigured script. A 256-bit
/// token cannot be guessed; this keeps a scanner from filling the security
/// log and the disk, and names it.
pub const FAILED_LOGINS_PER_MINUTE: u32 = 10;

/// Failed logins per client address, in windows of a minute.
#[derive(Debug)]
pub struct Throttle {
    limit: u32,
    seen: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (i64, u32)>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(FAILED_LOGINS_PER_MINUTE)
    }
}

impl Throttle {
    /// At most `limit` failed logins per address and minute (0: no limit).
    pub fn new(limit: u32) -> Throttle {
        Throttle {
            limit,
            seen: Default::default(),
        }
    }

    /// Seconds until `ip` may try again, if it is held back at `now`.
    pub fn blocked(&self, ip: std::net::IpAddr, now: i64) -> Option<i64> {
        if self.limit == 0 {
            return None;
        }
        let map = self.seen.lock().ok()?;
        let (start, n) = *map.get(&ip)?;
        (n >= self.limit && now - start < 60).then_some(60 - (now - start))
    }

    /// Counts a failed login from `ip`.
    pub fn failed(&self, ip: std::net::IpAddr, now: i64) {
        if self.limit == 0 {
            return;
        }
        let Ok(mut map) = self.seen.lock() else {
            return;
        };
        if map.len() >= 10_000 {
            // Bounded: windows that are over are forgotten.
            map.retain(|_, (start, _)| now - *start < 60);
        }
        let e = map.entry(ip).or_insert((now, 0));
        if now - e.0 >= 60 {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

/// The client's address (when served with connection info).
fn client(ext: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The answer to a wrong token from an address past its failed logins.
fn held_back(s: &Server, ip: std::net::IpAddr) -> Option<Response> {
    let wait = s.throttle.blocked(ip, now())?;
    let mut r = ApiError::new(
        429,
        format!("too many failed logins from {ip}: try again in {wait} s"),
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Some(r)
}

/// A refused request: a security event naming where it came from.
fn refused(s: &Server, from: Option<std::net::IpAddr>, reason: String) {
    let source = match from {
        Some(ip) => format!("HTTP API from {ip}"),
        None => "HTTP API".to_string(),
    };
    let _ = s.commands.try_send((
        Caller::Surface(source.clone()),
        Command::Security { source, reason },
        oneshot::channel().0,
    ));
}

/// Operator tokens made or revoked on the anchor's host since the last
/// request, to the timeline.
fn token_news(s: &Server) {
    for (kind, subject, text) in s.tokens.take_news() {
        let _ = s.commands.try_send((
            Caller::Surface("operators.json on the anchor's host".into()),
            Command::Audit {
                kind: kind.into(),
                subject,
                text,
            },
            oneshot::channel().0,
        ));
    }
}

type Shared = Arc<Server>;

/// Every route (method, path) as in `openapi.json`, with the least role a
/// token needs for it (`None`: no token). The OpenAPI document gives the same
/// as each operation's `x-shoal-role`; a route missing here is refused.
pub const ROUTES: &[(&str, &str, Option<ApiRole>)] = &[
    ("GET", "/healthz", None),
    ("GET", "/readyz", None),
    ("GET", "/metrics", Some(ApiRole::Viewer)),
    ("POST", "/api/login", None),
    ("POST", "/api/logout", Some(ApiRole::Viewer)),
    ("GET", "/api/whoami", Some(ApiRole::Viewer)),
    ("GET", "/api/openapi.json", Some(ApiRole::Viewer)),
    ("GET", "/api/overview", Some(ApiRole::Viewer)),
    ("GET", "/api/nodes", Some(ApiRole::Viewer)),
    ("GET", "/api/nodes/{name}", Some(ApiRole::Viewer)),
    ("DELETE", "/api/nodes/{name}", Some(ApiRole::Admin)),
    ("GET", "/api/nodes/{name}/series", Some(ApiRole::Viewer)),
    (
        "GET",
        "/api/nodes/{name}/series/{series}",
        Some(ApiRole::Viewer),
    ),
    ("GET", "/api/sites", Some(ApiRole::Viewer)),
    ("GET", "/api/sites/{name}", Some(ApiRole::Viewer)),
    ("DELETE", "/api/sites/{name}", Some(ApiRole::Operator)),
    ("GET", "/api/apps", Some(ApiRole::Viewer)),
    ("GET", "/api/apps/{name}", Some(ApiRole::Viewer)),
    ("DELETE", "/api/apps/{name}", Some(ApiRole::Operator)),
    ("GET", "/api/configs", Some(ApiRole::Viewer)),
    ("GET", "/api/configs/{name}", Some(ApiRole::Viewer)),
    ("DELETE", "/api/configs/{name}", Some(ApiRole::Operator)),
    ("DELETE", "/api/devices/{name}", Some(ApiRole::Operator)),
    ("DELETE", "/api/profiles/{name}", Some(ApiRole::Operator)),
    ("DELETE", "/api/artifacts/{name}", Some(ApiRole::Operator)),
    ("PUT", "/api/artifacts/{name}", Some(ApiRole::Operator)),
    ("POST", "/api/apply", Some(ApiRole::SiteEngineer)),
    ("POST", "/api/prepare", Some(ApiRole::SiteEngineer)),
    ("GET", "/api/keys", Some(ApiRole::Admin)),
    ("POST", "/api/keys/invite", Some(ApiRole::Admin)),
    ("POST", "/api/keys/enroll", Some(ApiRole::Viewer)),
    ("POST", "/api/keys/certificates", Some(ApiRole::Admin)),
    ("GET", "/api/bundle", Some(ApiRole::Viewer)),
    ("POST", "/api/changes", Some(ApiRole::SiteEngineer)),
    ("GET", "/api/rollouts", Some(ApiRole::Viewer)),
    ("GET", "/api/rollouts/{app}", Some(ApiRole::Viewer)),
    (
        "POST",
        "/api/rollouts/{app}/{action}",
        Some(ApiRole::Operator),
    ),
    ("GET", "/api/conflicts", Some(ApiRole::Viewer)),
    ("POST", "/api/conflicts/resolve", Some(ApiRole::Operator)),
    ("GET", "/api/security", Some(ApiRole::Viewer)),
    ("GET", "/api/timeline", Some(ApiRole::Viewer)),
    ("GET", "/api/events", Some(ApiRole::Viewer)),
    ("GET", "/api/get/{what}", Some(ApiRole::Viewer)),
    ("GET", "/api/demo", Some(ApiRole::Viewer)),
    (
        "POST",
        "/api/demo/sites/{site}/cut",
        Some(ApiRole::Operator),
    ),
    (
        "POST",
        "/api/demo/sites/{site}/restore",
        Some(ApiRole::Operator),
    ),
    (
        "POST",
        "/api/demo/sites/{site}/edit",
        Some(ApiRole::Operator),
    ),
];

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("openapi.json");
const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");
/// The official `@automerge/automerge` browser build (its WebAssembly
/// inline), fetched by `build.rs` at the version `ui/package-lock.json`
/// pins: the UI loads it only to decode and check a change before it
/// signs it (ADR 0015).
const AUTOMERGE_JS: &[u8] = include_bytes!(env!("SHOAL_AUTOMERGE_JS"));
/// Where the UI loads it from (the version in the path, so it is cached
/// for good and a new one is fetched).
pub const AUTOMERGE_PATH: &str = concat!(
    "/ui/vendor/automerge-",
    env!("SHOAL_AUTOMERGE_VERSION"),
    ".js"
);
/// The session cookie's name.
pub const COOKIE: &str = "shoal_session";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The router (for tests that serve it themselves).
pub fn router(server: Server) -> Router {
    let shared: Shared = Arc::new(server);
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/logout", post(logout))
        .route("/api/whoami", get(whoami))
        .route("/api/openapi.json", get(openapi))
        .route("/api/overview", get(overview))
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{name}", get(node).delete(delete_entity))
        // A series name holds slashes (`device/resource`): the rest of the
        // path, or one segment with them escaped.
        .route("/api/nodes/{name}/series", get(series_list))
        .route("/api/nodes/{name}/series/{*series}", get(series))
        .route("/api/sites", get(sites))
        .route("/api/sites/{name}", get(site).delete(delete_entity))
        .route("/api/apps", get(apps))
        .route("/api/apps/{name}", get(app).delete(delete_entity))
        .route("/api/configs", get(configs))
        .route("/api/configs/{name}", get(config).delete(delete_entity))
        .route("/api/devices/{name}", axum::routing::delete(delete_entity))
        .route("/api/profiles/{name}", axum::routing::delete(delete_entity))
        .route(
            "/api/artifacts/{name}",
            put(upload)
                .layer(DefaultBodyLimit::disable())
                .delete(delete_entity),
        )
        .route("/api/apply", post(apply))
        .route("/api/prepare", post(prepare))
        .route("/api/keys", get(keys_list))
        .route("/api/keys/invite", post(key_invite))
        .route("/api/keys/enroll", post(key_enroll))
        .route("/api/keys/certificates", post(key_certificate))
        .route("/api/bundle", get(bundle))
        .route(
            "/api/changes",
            post(changes).layer(DefaultBodyLimit::max(MAX_CHANGES_BODY)),
        )
        .route("/api/rollouts", get(rollouts))
        .route("/api/rollouts/{app}", get(rollout_status))
        .route("/api/rollouts/{app}/{action}", post(rollout_action))
        .route("/api/conflicts", get(conflicts))
        .route("/api/conflicts/resolve", post(resolve))
        .route("/api/security", get(security))
        .route("/api/timeline", get(timeline))
        .route("/api/events", get(events))
        .route("/api/get/{what}", get(cli_get))
        .route("/api/demo", get(demo))
        .route("/api/demo/sites/{site}/cut", post(demo_cut))
        .route("/api/demo/sites/{site}/restore", post(demo_restore))
        .route("/api/demo/sites/{site}/edit", post(demo_edit))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/login", post(login))
        .route(
            "/",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    INDEX_HTML,
                )
            }),
        )
        .route(
            "/ui/app.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    APP_JS,
                )
            }),
        )
        .route(
            AUTOMERGE_PATH,
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
                    ],
                    AUTOMERGE_JS,
                )
            }),
        )
        .route(
            "/ui/style.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    STYLE_CSS,
                )
            }),
        )
        .merge(api)
        .fallback(|| async { ApiError::new(404, "no such endpoint") })
        .layer(DefaultBodyLimit::max(
            manifest::MAX_MANIFEST_BYTES + (64 << 10),
        ))
        .layer(middleware::map_response(json_errors))
        .with_state(shared)
}

/// Every error answer in the one shape the OpenAPI document gives
/// (`application/json`, `{"error": …}`): axum's own refusals (a malformed
/// query string or JSON body, a wrong content type, a body too large) come
/// as plain text, and are rewritten here.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (_, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError::new(status.as_u16(), text).into_response()
}

/// Serves the API on `addr`, over TLS with `tls` (plain HTTP without);
/// returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    tls: Option<Arc<daemon::tls::ServerConfig>>,
    server: Server,
) -> anyhow::Result<SocketAddr> {
    use axum::serve::ListenerExt;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("HTTP API on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let app = router(server).into_make_service_with_connect_info::<SocketAddr>();
    let span = tracing::info_span!("operator_api", %local);
    match tls {
        Some(config) => {
            // `tap_io` gives the listener the client address axum's
            // ConnectInfo takes.
            let listener = daemon::tls::TlsListener::new(listener, config)?.tap_io(|_| {});
            tokio::spawn(
                async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "HTTPS API stopped");
                    }
                }
                .instrument(span),
            );
        }
        None => {
            tokio::spawn(
                async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "HTTP API stopped");
                    }
                }
                .instrument(span),
            );
        }
    }
    Ok(local)
}

/// The bearer token or session cookie of a request.
fn token_of(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The operator a request is made by (set by [`authenticate`]): name, role,
/// the site of a site engineer, and the client's address.
#[derive(Clone, Debug)]
struct Operator(String, ApiRole, Option<String>, Option<std::net::IpAddr>);

/// The least role a route needs; `None` for a route not in [`ROUTES`]
/// (refused: a route nobody gave a role is nobody's).
pub fn route_role(method: &str, path: &str) -> Option<Option<ApiRole>> {
    // axum names a catch-all segment `{*x}`; the table and OpenAPI `{x}`.
    let path = path.replace("{*", "{");
    ROUTES
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .map(|(_, _, r)| *r)
}

/// A request carried by the session cookie that changes something must
/// come from the UI's own origin (defence in depth: the cookie is
/// SameSite=Strict already).
fn cross_site(req: &Request) -> bool {
    let h = req.headers();
    if h.contains_key(header::AUTHORIZATION) || req.method() == axum::http::Method::GET {
        return false;
    }
    let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin.split_once("://").map(|(_, o)| o) != Some(host)
}

async fn authenticate(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    tracing::debug!(method = %req.method(), path = %req.uri().path(), "HTTP request");
    if cross_site(&req) {
        return ApiError::new(403, "a cross-site request with the session cookie").into_response();
    }
    let from = client(req.extensions());
    let token = token_of(req.headers());
    let who = token.as_deref().and_then(|t| s.tokens.check(t, now()));
    token_news(&s);
    match who {
        Some(TokenEntry {
            name, role, site, ..
        }) => {
            let route = req
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map(|m| m.as_str().to_string())
                .unwrap_or_default();
            let needed = route_role(req.method().as_str(), &route);
            let refusal = match needed {
                Some(None) => None,
                Some(Some(r)) if role >= r => None,
                Some(Some(r)) => Some(format!(
                    "{} {route} needs the {r} role; {name}'s token is {role}",
                    req.method()
                )),
                None => Some(format!("{} {route} has no role set", req.method())),
            };
            if let Some(reason) = refusal {
                refused(&s, from, format!("refused {name}: {reason}"));
                return ApiError::new(403, reason).into_response();
            }
            req.extensions_mut()
                .insert(Operator(name, role, site, from));
            next.run(req).await
        }
        None => {
            let reason = match token {
                None => "no operator token".to_string(),
                Some(_) => "unknown, revoked or expired operator token".to_string(),
            };
            if let (Some(ip), Some(_)) = (from, &token) {
                if let Some(r) = held_back(&s, ip) {
                    return r;
                }
                s.throttle.failed(ip, now());
            }
            refused(
                &s,
                from,
                format!("{} {}: {reason}", req.method(), req.uri().path()),
            );
            let mut r = ApiError::new(401, reason).into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

fn user(req_ext: &axum::http::Extensions) -> Caller {
    req_ext
        .get::<Operator>()
        .map(caller_of)
        .unwrap_or_else(|| Caller::Operator(String::new(), None))
}

/// The caller an operator's request is: the token's name, and the client's
/// address for the audit trail.
fn caller_of(op: &Operator) -> Caller {
    Caller::Operator(op.0.clone(), op.3.map(|ip| ip.to_string()))
}

/// Sends a command to the daemon's one command surface as `caller`.
async fn call(s: &Server, caller: Caller, cmd: Command) -> Result<Answer, ApiError> {
    let (tx, rx) = oneshot::channel();
    s.commands
        .send((caller, cmd, tx))
        .await
        .map_err(|_| ApiError::new(503, "the anchor is stopping"))?;
    rx.await
        .map_err(|_| ApiError::new(503, "the anchor is stopping"))?
        .map_err(ApiError::from)
}

fn answer(a: Answer) -> Response {
    match a {
        Answer::Text(t) => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], t).into_response()
        }
        Answer::Json(v) => axum::Json(v).into_response(),
        Answer::Bytes(b) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], b).into_response()
        }
        Answer::Blocking(_) => {
            ApiError::new(500, "internal: a store read was not run").into_response()
        }
    }
}

fn snap(s: &Server) -> Arc<Snapshot> {
    s.snapshot.borrow().clone()
}

/// Parses a JSON body, naming the field at fault.
fn body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let mut err = ApiError::new(400, format!("request body: {path}: {}", e.inner()));
        if path != "." {
            err.field = Some(path);
        }
        err
    })
}

async fn ready(State(s): State<Shared>) -> Response {
    if snap(&s).version > 0 {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

async fn login(State(s): State<Shared>, ext: axum::http::Extensions, bytes: Bytes) -> Response {
    let from = client(&ext);
    let l: Login = match body(&bytes) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let checked = s.tokens.check(&l.token, now());
    token_news(&s);
    match checked {
        Some(t) => {
            let _ = s.commands.try_send((
                Caller::Operator(t.name.clone(), from.map(|ip| ip.to_string())),
                Command::Login {
                    role: t.role.as_str().to_string(),
                },
                oneshot::channel().0,
            ));
            let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", l.token);
            let mut r = axum::Json(json!({ "operator": t.name, "role": t.role, "site": t.site }))
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        None => {
            if let Some(ip) = from {
                if let Some(r) = held_back(&s, ip) {
                    return r;
                }
                s.throttle.failed(ip, now());
            }
            refused(
                &s,
                from,
                "login with an unknown, revoked or expired operator token".into(),
            );
            ApiError::new(401, "unknown, revoked or expired operator token").into_response()
        }
    }
}

async fn logout() -> Response {
    let mut r = axum::Json(json!({ "ok": true })).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("shoal_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

async fn whoami(State(s): State<Shared>, req: Request) -> Response {
    let sn = snap(&s);
    let who = req.extensions().get::<Operator>();
    axum::Json(json!({
        "operator": who.map(|o| o.0.clone()).unwrap_or_default(),
        "role": who.map(|o| o.1),
        "site": who.and_then(|o| o.2.clone()),
        "fleet": sn.fleet,
        "anchor": sn.anchor,
        "demo": s.demo.is_some(),
        // Whether the anchor signs UI edits with an operator identity of
        // its own (ADR 0006); without one, the browser signs (ADR 0015).
        "automerge": AUTOMERGE_PATH,
        "anchor_signs": s.tokens.dir().join(crdt_state::local::datadir::IDENTITY_FILE).exists(),
    }))
    .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn overview(State(s): State<Shared>) -> Response {
    let sn = snap(&s);
    let mut totals: BTreeMap<&str, usize> = BTreeMap::new();
    for n in sn.nodes.iter() {
        let k = match n.state {
            NodeState::Ok => "ok",
            NodeState::Behind => "behind",
            NodeState::Failed => "failed",
            NodeState::Offline => "offline",
            NodeState::Unknown => "unknown",
        };
        *totals.entry(k).or_default() += 1;
    }
    axum::Json(json!({
        "version": sn.version,
        "fleet": sn.fleet,
        "anchor": sn.anchor,
        "nodes": sn.nodes.len(),
        "connected": sn.nodes.iter().filter(|n| n.connected).count(),
        "states": totals,
        "sites": &*sn.sites,
        "apps": sn.spec.apps.len(),
        "configs": sn.spec.configs.len(),
        "conflicts": sn.conflicts.len(),
        "security_events": sn.security_total,
    }))
    .into_response()
}

/// `?page=&per_page=`: 1-based page, at most 500 per page.
#[derive(Debug, Deserialize)]
struct Paging {
    page: Option<usize>,
    per_page: Option<usize>,
}

impl Paging {
    /// Refuses what the OpenAPI document does not allow (a page below 1, a
    /// page size outside 1–500), naming the parameter.
    fn check(&self) -> Result<(), ApiError> {
        let bad = |field: &str, msg: String| {
            let mut e = ApiError::new(400, msg);
            e.field = Some(field.into());
            Err(e)
        };
        if self.page.is_some_and(|p| !(1..=1_000_000_000).contains(&p)) {
            return bad("page", "page: pages count from 1 (to 10⁹)".into());
        }
        if let Some(n) = self.per_page
            && !(1..=500).contains(&n)
        {
            return bad("per_page", format!("per_page {n}: between 1 and 500"));
        }
        Ok(())
    }
}

fn paginate<T: Serialize>(items: Vec<T>, p: &Paging) -> Value {
    let per_page = p.per_page.unwrap_or(50).clamp(1, 500);
    let pages = items.len().div_ceil(per_page).max(1);
    let page = p.page.unwrap_or(1).clamp(1, pages);
    let total = items.len();
    let slice: Vec<T> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    json!({ "total": total, "page": page, "pages": pages, "per_page": per_page, "items": slice })
}

#[derive(Debug, Deserialize)]
struct NodeQuery {
    q: Option<String>,
    site: Option<String>,
    label: Option<String>,
    state: Option<String>,
    page: Option<usize>,
    per_page: Option<usize>,
}

async fn nodes(State(s): State<Shared>, Query(q): Query<NodeQuery>) -> Response {
    if let Err(e) = (Paging {
        page: q.page,
        per_page: q.per_page,
    })
    .check()
    {
        return e.into_response();
    }
    let sn = snap(&s);
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(st) => match NodeState::parse(st) {
            Some(x) => Some(x),
            None => {
                let mut e = ApiError::new(
                    400,
                    format!("state {st:?}: expected ok, behind, failed, offline or unknown"),
                );
                e.field = Some("state".into());
                return e.into_response();
            }
        },
    };
    let label = match q.label.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(l) => match l.split_once('=') {
            Some((k, v)) => Some((k.to_string(), v.to_string())),
            None => {
                let mut e = ApiError::new(400, format!("label {l:?}: expected key=value"));
                e.field = Some("label".into());
                return e.into_response();
            }
        },
    };
    let needle = q.q.as_deref().unwrap_or("").to_lowercase();
    let items: Vec<_> = sn
        .nodes
        .iter()
        .filter(|n| needle.is_empty() || n.name.to_lowercase().contains(&needle))
        .filter(|n| {
            q.site
                .as_deref()
                .is_none_or(|s| s.is_empty() || n.site == s)
        })
        .filter(|n| state.is_none_or(|st| n.state == st))
        .filter(|n| {
            label
                .as_ref()
                .is_none_or(|(k, v)| n.labels.get(k) == Some(v))
        })
        .collect();
    let paging = Paging {
        page: q.page,
        per_page: q.per_page,
    };
    axum::Json(paginate(items, &paging)).into_response()
}

async fn node(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    let sn = snap(&s);
    let Some(row) = sn.nodes.iter().find(|n| n.name == name) else {
        return ApiError::new(404, format!("no node {name:?}")).into_response();
    };
    let overrides = sn.overrides.get(&row.site);
    let desired = crdt_state::fleet::placement::share(&sn.spec, overrides, &name, &|_| true);
    let timeline: Vec<_> = sn
        .timeline
        .iter()
        .rev()
        .filter(|e| e.subject == name)
        .take(20)
        .collect();
    axum::Json(json!({
        "node": row,
        "desired": desired,
        "devices": row.devices,
        "timeline": timeline,
    }))
    .into_response()
}

/// The series that came up from a node.
async fn series_list(State(s): State<Shared>, Path(node): Path<String>) -> Response {
    data_read(&s, move |store| {
        store
            .landed_series(&node)
            .map(|items| json!({ "items": items }))
    })
    .await
}

/// Runs a read of the data that came up on a blocking thread and answers
/// with it (503 on an anchor that keeps none).
async fn data_read<T: Serialize + Send + 'static>(
    s: &Server,
    read: impl FnOnce(&crdt_state::Store) -> crdt_state::Result<T> + Send + 'static,
) -> Response {
    let Some(store) = s.store.clone() else {
        return ApiError::new(503, "this anchor keeps no data").into_response();
    };
    match tokio::task::spawn_blocking(move || read(&store)).await {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => ApiError::new(500, format!("the anchor's store: {e}")).into_response(),
        Err(e) => ApiError::new(500, format!("internal: {e}")).into_response(),
    }
}

#[derive(Deserialize)]
struct SeriesQuery {
    from: Option<u64>,
    to: Option<u64>,
    step: Option<u64>,
}

/// A series of a node over a time range (ms since the epoch; by default
/// the last day), every record or per `step` ms.
async fn series(
    State(s): State<Shared>,
    Path((node, series)): Path<(String, String)>,
    Query(q): Query<SeriesQuery>,
) -> Response {
    let series = series.trim_start_matches('/').to_string();
    let latest = daemon::data::LATEST_MS;
    if [q.from, q.to, q.step].iter().flatten().any(|v| *v > latest) {
        return ApiError::new(
            400,
            format!("from, to and step are milliseconds, at most {latest}"),
        )
        .into_response();
    }
    let to =
        q.to.unwrap_or_else(|| (now().max(0) as u64).saturating_mul(1000));
    let from = q.from.unwrap_or_else(|| to.saturating_sub(86_400_000));
    // A range that ends before it starts holds nothing; a step too small
    // for the range is raised to the smallest that keeps to MAX_POINTS
    // (the answer says which it used).
    let to = to.max(from);
    let step = match q.step.unwrap_or(0) {
        0 => 0,
        s => s.max((to - from).div_ceil(crate::series::MAX_POINTS)),
    };
    data_read(&s, move |store| {
        store
            .landed(&node, &series, from, to, crate::series::MAX_RECORDS + 1)
            .map(|landed| crate::series::shape(&node, &series, from, to, step, landed))
    })
    .await
}

async fn sites(State(s): State<Shared>) -> Response {
    axum::Json(json!({ "items": &*snap(&s).sites })).into_response()
}

async fn site(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    let sn = snap(&s);
    let row = sn.sites.iter().find(|r| r.name == name);
    let ov = sn.overrides.get(&name);
    if row.is_none() && ov.is_none() {
        return ApiError::new(404, format!("no site {name:?}")).into_response();
    }
    axum::Json(json!({ "site": row, "overrides": ov })).into_response()
}

/// A manifest of one entity, as YAML people edit.
fn manifest_yaml<T: Serialize>(kind: &str, name: &str, spec: &T) -> String {
    let v = json!({
        "apiVersion": manifest::API_VERSION,
        "kind": kind,
        "metadata": { "name": name },
        "spec": spec,
    });
    serde_yaml::to_string(&v).unwrap_or_default()
}

async fn apps(State(s): State<Shared>) -> Response {
    let sn = snap(&s);
    let mut counts: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for n in sn.nodes.iter() {
        for (a, w) in &n.workloads {
            let st = serde_json::to_value(w.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            *counts.entry(a.as_str()).or_default().entry(st).or_default() += 1;
        }
    }
    let items: Vec<Value> = sn
        .spec
        .apps
        .iter()
        .map(|(name, spec)| json!({ "name": name, "spec": spec, "workloads": counts.get(name.as_str()) }))
        .collect();
    axum::Json(json!({ "items": items })).into_response()
}

/// One entity: its spec and its manifest as YAML, or a 404.
fn entity<T: Serialize>(kind: &str, name: &str, spec: Option<&T>) -> Response {
    match spec {
        Some(spec) => axum::Json(json!({
            "name": name, "spec": spec, "yaml": manifest_yaml(kind, name, spec)
        }))
        .into_response(),
        None => ApiError::new(404, format!("no {} {name:?}", kind.to_lowercase())).into_response(),
    }
}

async fn app(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    entity("App", &name, snap(&s).spec.apps.get(&name))
}

async fn configs(State(s): State<Shared>) -> Response {
    let sn = snap(&s);
    let items: Vec<Value> = sn
        .spec
        .configs
        .iter()
        .map(|(name, spec)| json!({ "name": name, "spec": spec }))
        .collect();
    axum::Json(json!({ "items": items })).into_response()
}

async fn config(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    entity("Config", &name, snap(&s).spec.configs.get(&name))
}

async fn delete_entity(State(s): State<Shared>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let who = user(req.extensions());
    let mut parts = path.trim_start_matches("/api/").splitn(2, '/');
    let (Some(kind), Some(name)) = (parts.next(), parts.next()) else {
        return ApiError::new(404, "no such endpoint").into_response();
    };
    let Some(kind) = Kind::parse(kind) else {
        return ApiError::new(404, "no such endpoint").into_response();
    };
    let name = percent_decode(name);
    match call(
        &s,
        who,
        Command::Delete {
            kind: kind.as_str().to_string(),
            name,
            identity: None,
            output: None,
        },
    )
    .await
    {
        Ok(a) => answer(a),
        Err(e) => e.into_response(),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or(""), 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyFile {
    name: String,
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    files: Vec<ApplyFile>,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Deserialize)]
struct OutputQuery {
    output: Option<String>,
}

async fn apply(
    State(s): State<Shared>,
    Query(q): Query<OutputQuery>,
    headers: HeaderMap,
    req_ext: axum::Extension<Operator>,
    bytes: Bytes,
) -> Response {
    let output = match q.output.as_deref().map(str::parse::<Format>) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => return ApiError::new(400, e).into_response(),
    };
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let req: ApplyBody = if is_json {
        match body(&bytes) {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        }
    } else {
        match std::str::from_utf8(&bytes) {
            Ok(t) => ApplyBody {
                files: vec![ApplyFile {
                    name: "request".into(),
                    text: t.to_string(),
                }],
                dry_run: false,
            },
            Err(_) => return ApiError::new(400, "request body is not UTF-8 text").into_response(),
        }
    };
    let manifests = match parse_files(&req.files) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = may_apply(&s, &req_ext.0, &manifests) {
        return e.into_response();
    }
    if req.dry_run {
        let names: Vec<String> = manifests
            .iter()
            .map(|m| format!("{}/{}", m.kind().as_str().to_lowercase(), m.name))
            .collect();
        return axum::Json(json!({ "valid": names })).into_response();
    }
    let files = req.files.into_iter().map(|f| (f.name, f.text)).collect();
    match call(
        &s,
        caller_of(&req_ext.0),
        Command::Apply {
            files,
            identity: None,
            output: output.map(|f| f.to_string()),
        },
    )
    .await
    {
        Ok(a) => answer(a),
        Err(e) => e.into_response(),
    }
}

/// The manifests of an apply request (at least one).
fn parse_files(files: &[ApplyFile]) -> Result<Vec<manifest::Manifest>, ApiError> {
    if files.is_empty() {
        return Err(ApiError::new(400, "no manifests given"));
    }
    let mut manifests = Vec::new();
    for f in files {
        manifests.extend(
            manifest::parse(&f.name, &f.text)
                .map_err(|e| ApiError(Refusal::from(crdt_state::Error::from(e))))?,
        );
    }
    if manifests.is_empty() {
        return Err(ApiError::new(400, "the request holds no manifest"));
    }
    Ok(manifests)
}

/// A site engineer's token applies its own site's overrides only; a
/// refusal is a security event.
fn may_apply(s: &Server, op: &Operator, manifests: &[manifest::Manifest]) -> Result<(), ApiError> {
    let Operator(who, role, site, from) = op;
    if *role != ApiRole::SiteEngineer {
        return Ok(());
    }
    let site = site.as_deref().unwrap_or_default();
    match manifests
        .iter()
        .find(|m| m.kind() != Kind::SiteOverride || m.name != site)
    {
        Some(m) => {
            let reason = format!(
                "{who} is a site engineer of {site}: applies only SiteOverride {site}, not {}/{} (that needs the operator role)",
                m.kind().as_str().to_lowercase(),
                m.name
            );
            refused(s, *from, format!("refused {who}: {reason}"));
            Err(ApiError::new(403, reason))
        }
        None => Ok(()),
    }
}

/// An edit to prepare for signing in the browser (`POST /api/prepare`),
/// as the routes that make it with the anchor's key take it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum PrepareBody {
    Apply { files: Vec<ApplyFile> },
    Delete { kind: String, name: String },
    Resolve(ResolveBody),
    Rollout { app: String, action: String },
}

/// What an edit would write and, for `?key=`, the unsigned changes that
/// write it as that key, for the operator's browser to check against what
/// it shows, sign with its own key and send to `POST /api/changes` (ADR
/// 0015). Each edit needs the role its own route needs; nothing is written
/// here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrepareQuery {
    /// The browser key to make the unsigned changes for (64 hex digits).
    key: Option<crdt_state::PublicKey>,
}

async fn prepare(
    State(s): State<Shared>,
    Query(q): Query<PrepareQuery>,
    req_ext: axum::Extension<Operator>,
    bytes: Bytes,
) -> Response {
    let p: PrepareBody = match body(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let op = &req_ext.0;
    let (needed, edit) = match p {
        PrepareBody::Apply { files } => {
            let manifests = match parse_files(&files) {
                Ok(m) => m,
                Err(e) => return e.into_response(),
            };
            if let Err(e) = may_apply(&s, op, &manifests) {
                return e.into_response();
            }
            let files = files.into_iter().map(|f| (f.name, f.text)).collect();
            (
                ApiRole::SiteEngineer,
                Command::Apply {
                    files,
                    identity: None,
                    output: None,
                },
            )
        }
        PrepareBody::Delete { kind, name } => {
            let Some(k) = Kind::parse(&kind) else {
                let mut e = ApiError::new(400, format!("kind: unknown kind {kind:?}"));
                e.field = Some("delete.kind".into());
                return e.into_response();
            };
            let route = format!("/api/{}/{{name}}", crate::client::collection(k));
            let needed = route_role("DELETE", &route)
                .flatten()
                .unwrap_or(ApiRole::Admin);
            (
                needed,
                Command::Delete {
                    kind,
                    name,
                    identity: None,
                    output: None,
                },
            )
        }
        PrepareBody::Resolve(r) => {
            if let Err(e) = conflicting(&snap(&s), &r) {
                return e.into_response();
            }
            (
                ApiRole::Operator,
                Command::Resolve {
                    doc: r.doc,
                    field: r.field,
                    value: r.value,
                },
            )
        }
        PrepareBody::Rollout { app, action } => (
            ApiRole::Operator,
            Command::Rollout {
                app,
                action,
                output: None,
            },
        ),
    };
    if op.1 < needed {
        let reason = format!(
            "{} needs the {needed} role; {}'s token is {}",
            edit.verb(),
            op.0,
            op.1
        );
        refused(&s, op.3, format!("refused {}: {reason}", op.0));
        return ApiError::new(403, reason).into_response();
    }
    let cmd = Command::Prepare {
        edit: Box::new(edit),
        key: q.key,
    };
    match call(&s, caller_of(op), cmd).await {
        Ok(a) => answer(a),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteBody {
    name: String,
    role: String,
    #[serde(default)]
    site: Option<String>,
    /// Seconds the code is good for (a day when absent).
    #[serde(default)]
    ttl_s: Option<i64>,
}

/// Runs file work of the key invitations off the loop.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(500, format!("internal: {e}")))?
}

/// Records something an operator did in the timeline (who and from where);
/// a failure to record is logged, not the request's failure.
async fn audit(s: &Server, op: &Operator, kind: &str, subject: &str, text: String) {
    let cmd = Command::Audit {
        kind: kind.into(),
        subject: subject.into(),
        text,
    };
    if let Err(e) = call(s, caller_of(op), cmd).await {
        tracing::warn!(error = %e.0, kind, subject, "not recorded in the timeline");
    }
}

/// An admin invites a writer to enroll a browser key: a one-time code
/// (shown once) for that name, role and site (ADR 0015).
async fn key_invite(
    State(s): State<Shared>,
    req_ext: axum::Extension<Operator>,
    bytes: Bytes,
) -> Response {
    let b: InviteBody = match body(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let role = match b.role.parse::<crdt_state::Role>() {
        Ok(r) => r,
        Err(e) => {
            let mut e = ApiError::new(400, format!("role: {e}"));
            e.field = Some("role".into());
            return e.into_response();
        }
    };
    let dir = s.tokens.dir().to_path_buf();
    let by = req_ext.0.0.clone();
    let (name, site) = (b.name.clone(), b.site.clone());
    let at = now();
    let ttl = b.ttl_s.unwrap_or(crate::keys::DEFAULT_TTL_S);
    let code = blocking(move || {
        crate::keys::invite(&dir, &name, role, site.as_deref(), &by, ttl, at)
            .map_err(|e| ApiError::new(400, format!("{e:#}")))
    })
    .await;
    let code = match code {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let site = b
        .site
        .as_deref()
        .map(|s| format!(" of {s}"))
        .unwrap_or_default();
    audit(
        &s,
        &req_ext.0,
        "invited",
        &b.name,
        format!(
            "{} invited {} ({role}{site}) to enroll a browser key",
            req_ext.0.0, b.name
        ),
    )
    .await;
    axum::Json(json!({
        "code": code,
        "name": b.name,
        "role": role.to_string(),
        "site": b.site,
        "expires_at": at + ttl,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollBody {
    code: String,
    /// The browser key's public half, 64 hex digits.
    key: String,
}

/// A browser sends its new public key with an invitation's code. The code
/// binds to that key; the answer says whether the key is certified yet.
/// An anchor that still holds the fleet root certifies it at once; any
/// other waits for an admin's `shoal identity approve` (asking again with
/// the same code and key answers the state now).
async fn key_enroll(
    State(s): State<Shared>,
    req_ext: axum::Extension<Operator>,
    bytes: Bytes,
) -> Response {
    let b: EnrollBody = match body(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let key = match crdt_state::PublicKey::from_hex(b.key.trim()) {
        Ok(k) => k,
        Err(e) => {
            let mut e = ApiError::new(400, format!("key: {e}"));
            e.field = Some("key".into());
            return e.into_response();
        }
    };
    let op = req_ext.0.clone();
    let dir = s.tokens.dir().to_path_buf();
    let at = now();
    let d = dir.clone();
    let submitted = blocking(move || {
        crate::keys::submit(&d, &b.code, key, at).map_err(|r| ApiError::new(r.0, r.1))
    })
    .await;
    let (mut invite, first) = match submitted {
        Ok(i) => i,
        Err(e) => {
            refused(
                &s,
                op.3,
                format!("refused a browser key from {}: {}", op.0, e.0.error),
            );
            return e.into_response();
        }
    };
    if first {
        audit(
            &s,
            &op,
            "key-requested",
            &invite.name,
            format!(
                "a browser key {} came for {}'s invitation",
                crate::keys::fingerprint(&key),
                invite.name
            ),
        )
        .await;
    }
    let root_here = dir.join(crdt_state::local::datadir::ROOT_KEY_FILE).exists();
    if invite.certificate.is_none() && root_here {
        let i = invite.clone();
        let d = dir.clone();
        let issued = blocking(move || {
            use crdt_state::local::datadir::{issue_in, root_public};
            let root = root_public(&d)
                .map_err(|e| ApiError::new(500, format!("the root key here: {e}")))?;
            issue_in(&d, &root, key, i.role, i.site.as_deref(), &i.name, at)
                .map_err(|e| ApiError::new(500, format!("issuing the certificate: {e}")))
        })
        .await;
        match issued {
            Ok(cert) => match publish(&s, &op, cert).await {
                Ok(i) => invite = i,
                Err(e) => return e.into_response(),
            },
            Err(e) => return e.into_response(),
        }
    }
    axum::Json(invite.to_json(now())).into_response()
}

/// Publishes a root-issued certificate for an invited browser key (the
/// daemon checks it against the root) and records it with the invitation.
async fn publish(
    s: &Server,
    op: &Operator,
    cert: crdt_state::Certificate,
) -> Result<crate::keys::Invite, ApiError> {
    let dir = s.tokens.dir().to_path_buf();
    let c = cert.clone();
    let d = dir.clone();
    blocking(move || crate::keys::matching(&d, &c, now()).map_err(|r| ApiError::new(r.0, r.1)))
        .await?;
    call(s, caller_of(op), Command::Certify(Box::new(cert.clone()))).await?;
    blocking(move || {
        crate::keys::certified(&dir, &cert, now()).map_err(|r| ApiError::new(r.0, r.1))
    })
    .await
}

/// Every invitation and its state (admins); a certified key the daemon's
/// trust holds revoked (as of the last snapshot) shows as `revoked`.
async fn keys_list(State(s): State<Shared>) -> Response {
    let dir = s.tokens.dir().to_path_buf();
    let trust = snap(&s).trust.clone();
    match blocking(move || {
        crate::keys::read(&dir).map_err(|e| ApiError::new(500, format!("{e:#}")))
    })
    .await
    {
        Ok(items) => {
            let t = now();
            let items: Vec<Value> = items
                .iter()
                .map(|i| {
                    let mut v = i.to_json(t);
                    let revoked = i
                        .certificate
                        .as_ref()
                        .is_some_and(|c| trust.as_ref().is_some_and(|tr| tr.is_revoked(&c.key)));
                    if revoked {
                        v["state"] = json!("revoked");
                    }
                    v
                })
                .collect();
            axum::Json(json!({ "items": items })).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateBody {
    certificate: crdt_state::Certificate,
}

/// An admin's `shoal identity approve`: the certificate the fleet root
/// issued, on the admin's machine, for an invited browser key.
async fn key_certificate(
    State(s): State<Shared>,
    req_ext: axum::Extension<Operator>,
    bytes: Bytes,
) -> Response {
    let b: CertificateBody = match body(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match publish(&s, &req_ext.0, b.certificate).await {
        Ok(i) => axum::Json(i.to_json(now())).into_response(),
        Err(e) => {
            if e.0.status == 400 {
                refused(
                    &s,
                    req_ext.0.3,
                    format!("refused a certificate from {}: {}", req_ext.0.0, e.0.error),
                );
            }
            e.into_response()
        }
    }
}

/// Largest body of `POST /api/changes`: the signed changes of one edit
/// (an offline bundle's whole history goes through `shoal bundle import`).
pub const MAX_CHANGES_BODY: usize = 16 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleQuery {
    only: Option<String>,
}

/// The signed changes of some documents (`?only=fleet,site/north`) or all,
/// as an offline bundle: what an operator's CLI edits against and signs.
async fn bundle(
    State(s): State<Shared>,
    Query(q): Query<BundleQuery>,
    req_ext: axum::Extension<Operator>,
) -> Response {
    match call(&s, caller_of(&req_ext.0), Command::Export { only: q.only }).await {
        Ok(a) => answer(a),
        Err(e) => e.into_response(),
    }
}

/// Changes an operator built and signed on their own machine (an offline
/// bundle's encoding): verified like synced ones, then committed and
/// synced. Their signatures, not the token, give them authority; a bundle
/// that does not decode or verify is refused whole and is a security event.
async fn changes(
    State(s): State<Shared>,
    req_ext: axum::Extension<Operator>,
    bytes: Bytes,
) -> Response {
    let Operator(who, _, _, from) = &req_ext.0;
    let cmd = Command::Import {
        bundle: bytes.to_vec(),
        output: None,
    };
    match call(&s, caller_of(&req_ext.0), cmd).await {
        Ok(a) => answer(a),
        Err(e) => {
            if matches!(e.0.status, 400 | 403) {
                refused(
                    &s,
                    *from,
                    format!("refused signed changes sent by {who}: {}", e.0.error),
                );
            }
            e.into_response()
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UploadQuery {
    media_type: Option<String>,
    description: Option<String>,
}

/// Upload an artifact: the body is the file (its `Content-Length` is
/// required), streamed into the anchor's blob store while it is hashed (at
/// most a few chunks in memory), then declared as `kind: Artifact` through
/// the daemon's one write path, like `shoal artifact push`.
async fn upload(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    req_ext: axum::Extension<Operator>,
    body: axum::body::Body,
) -> Response {
    if let Err(e) = crdt_state::fleet::model::validate_name("artifact", &name) {
        return ApiError::new(400, format!("name: {e}")).into_response();
    }
    if let Some(m) = &q.media_type
        && !manifest::is_media_type(m)
    {
        return ApiError::new(
            400,
            format!("mediaType: {m:?} is not a media type like application/octet-stream"),
        )
        .into_response();
    }
    if q.description
        .as_ref()
        .is_some_and(|d| !manifest::is_line(d, 4096))
    {
        return ApiError::new(
            400,
            "description: at most 4096 characters, no control characters",
        )
        .into_response();
    }
    let Some(store) = s.blobs.clone() else {
        return ApiError::new(503, "this anchor keeps no blobs").into_response();
    };
    let Some(size) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return ApiError::new(400, "Content-Length: the file's size is required").into_response();
    };
    if size == 0 {
        return ApiError::new(400, "the body is empty: the file is the body").into_response();
    }
    // The body's chunks go to a blocking thread that hashes and writes them;
    // the channel is bounded, so a slow disk slows the upload.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let job = tokio::task::spawn_blocking(move || {
        let mut reader = ChunkReader {
            rx,
            chunk: Bytes::new(),
        };
        store.add_reader(&mut reader, std::path::Path::new("upload"), size, None)
    });
    let mut stream = body.into_data_stream();
    let mut sent = 0u64;
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let Ok(chunk) = chunk else {
            return ApiError::new(400, "the upload broke off").into_response();
        };
        sent += chunk.len() as u64;
        if sent > size || tx.send(chunk).await.is_err() {
            break;
        }
    }
    drop(tx);
    let stored = match job.await {
        Ok(r) => r,
        Err(_) => {
            return ApiError::new(500, "internal: the upload's writer stopped").into_response();
        }
    };
    if sent != size {
        return ApiError::new(
            400,
            format!("the body held {sent} bytes, Content-Length said {size}"),
        )
        .into_response();
    }
    let (hash, size) = match stored {
        Ok(r) => r,
        Err(e @ blobs::store::Error::Quota { .. }) => {
            return ApiError::new(507, e.to_string()).into_response();
        }
        Err(e) => return ApiError::new(500, format!("blob store: {e}")).into_response(),
    };
    let push = daemon::artifact::Push {
        name: name.clone(),
        media_type: q.media_type,
        description: q.description,
    };
    let manifest = daemon::artifact::manifest(&push, &hash, size);
    match call(
        &s,
        caller_of(&req_ext.0),
        Command::Apply {
            files: vec![(format!("upload of {name}"), manifest.to_string())],
            identity: None,
            output: Some("json".into()),
        },
    )
    .await
    {
        Ok(_) => axum::Json(json!({ "name": name, "hash": hash.to_string(), "size": size }))
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// A `Read` over the chunks of an upload (on a blocking thread).
struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.chunk = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

async fn conflicts(State(s): State<Shared>) -> Response {
    axum::Json(json!({ "items": &*snap(&s).conflicts })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    doc: String,
    field: String,
    value: Value,
}

/// A conflict settled must be one the anchor sees now, and the value kept
/// one of its values.
fn conflicting(sn: &Snapshot, r: &ResolveBody) -> Result<(), ApiError> {
    let Some(c) = sn
        .conflicts
        .iter()
        .find(|c| c.doc == r.doc && c.field == r.field)
    else {
        return Err(ApiError::new(
            409,
            format!(
                "no conflict on {} in {} (resolved already?)",
                r.field, r.doc
            ),
        ));
    };
    if !c.values.iter().any(|v| v.value == r.value) {
        let mut e = ApiError::new(400, "value: not one of the conflicting values");
        e.field = Some("value".into());
        return Err(e);
    }
    Ok(())
}

async fn resolve(
    State(s): State<Shared>,
    req_ext: axum::Extension<Operator>,
    bytes: Bytes,
) -> Response {
    let r: ResolveBody = match body(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = conflicting(&snap(&s), &r) {
        return e.into_response();
    }
    match call(
        &s,
        caller_of(&req_ext.0),
        Command::Resolve {
            doc: r.doc,
            field: r.field,
            value: r.value,
        },
    )
    .await
    {
        Ok(a) => answer(a),
        Err(e) => e.into_response(),
    }
}

async fn security(State(s): State<Shared>, Query(p): Query<Paging>) -> Response {
    if let Err(e) = p.check() {
        return e.into_response();
    }
    let sn = snap(&s);
    let items: Vec<_> = sn.security.iter().rev().collect();
    let mut v = paginate(items, &p);
    v["total_since_start"] = json!(sn.security_total);
    axum::Json(v).into_response()
}

#[derive(Debug, Deserialize)]
struct TimelineQuery {
    subject: Option<String>,
    page: Option<usize>,
    per_page: Option<usize>,
}

async fn timeline(State(s): State<Shared>, Query(q): Query<TimelineQuery>) -> Response {
    let sn = snap(&s);
    let items: Vec<_> = sn
        .timeline
        .iter()
        .rev()
        .filter(|e| {
            q.subject
                .as_deref()
                .is_none_or(|x| x.is_empty() || e.subject == x)
        })
        .collect();
    let p = Paging {
        page: q.page,
        per_page: q.per_page,
    };
    if let Err(e) = p.check() {
        return e.into_response();
    }
    axum::Json(paginate(items, &p)).into_response()
}

/// Live update streams open now.
static LIVE_STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts a live stream while it exists.
struct LiveStream;

impl LiveStream {
    fn new() -> LiveStream {
        LIVE_STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LiveStream
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        LIVE_STREAMS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn events(State(s): State<Shared>) -> Response {
    tracing::debug!("live update stream opened");
    let rx = (s.snapshot.clone(), LiveStream::new());
    let stream = futures::stream::unfold(rx, |(mut rx, guard)| async move {
        rx.changed().await.ok()?;
        let sn = rx.borrow_and_update().clone();
        let data = json!({ "version": sn.version, "changed": sn.changed }).to_string();
        Some((
            Ok::<_, std::convert::Infallible>(Event::default().event("update").data(data)),
            (rx, guard),
        ))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response()
}

/// Every rollout the fleet document holds, with its status.
async fn rollouts(State(s): State<Shared>, req_ext: axum::Extension<Operator>) -> Response {
    let apps: Vec<String> = snap(&s).spec.rollouts.keys().cloned().collect();
    let mut out = Vec::new();
    for app in apps {
        let cmd = Command::Rollout {
            app,
            action: "status".into(),
            output: None,
        };
        // A rollout of a revision the App no longer has is not shown.
        if let Ok(Answer::Json(v)) = call(&s, caller_of(&req_ext.0), cmd).await {
            out.push(v);
        }
    }
    answer(Answer::Json(json!({ "rollouts": out })))
}

/// One rollout: JSON, or text with `?output=table|json|yaml`.
async fn rollout_status(
    State(s): State<Shared>,
    req_ext: axum::Extension<Operator>,
    Path(app): Path<String>,
    Query(q): Query<OutputQuery>,
) -> Response {
    let cmd = Command::Rollout {
        app,
        action: "status".into(),
        output: q.output,
    };
    match call(&s, caller_of(&req_ext.0), cmd).await {
        Ok(a) => answer(a),
        Err(e) => e.into_response(),
    }
}

/// `pause`, `resume` or `abort` a rollout.
async fn rollout_action(
    State(s): State<Shared>,
    req_ext: axum::Extension<Operator>,
    Path((app, action)): Path<(String, String)>,
) -> Response {
    let cmd = Command::Rollout {
        app,
        action,
        output: None,
    };
    match call(&s, caller_of(&req_ext.0), cmd).await {
        Ok(a) => answer(a),
        Err(e) => e.into_response(),
    }
}

async fn cli_get(
    State(s): State<Shared>,
    req_ext: axum::Extension<Operator>,
    Path(what): Path<String>,
    Query(q): Query<OutputQuery>,
) -> Response {
    let output = match q.output.as_deref().unwrap_or("table").parse::<Format>() {
        Ok(f) => f,
        Err(e) => return ApiError::new(400, e).into_response(),
    };
    // What the snapshot holds is answered from it: a read never waits for
    // the daemon's loop, nor loads documents from the store. Nodes (with
    // live contacts) come from the loop's memory.
    let sn = snap(&s);
    let text = match what.as_str() {
        "apps" | "app" => Some(render::apps(output, &sn.spec)),
        "configs" | "config" => Some(render::configs(output, &sn.spec)),
        "profiles" | "profile" => Some(render::profiles(output, &sn.spec)),
        "devices" | "device" => Some(render::devices(output, &sn.spec)),
        "artifacts" | "artifact" => Some(render::artifacts(output, &sn.spec, &sn.holdings)),
        "sites" | "site" => Some(render::sites(output, &sn.overrides)),
        "conflicts" | "conflict" => Some(render::conflicts(output, &sn.conflicts)),
        _ => None,
    };
    if let Some(t) = text {
        return answer(Answer::Text(t));
    }
    let output = output.to_string();
    match call(&s, caller_of(&req_ext.0), Command::Get { what, output }).await {
        Ok(a) => answer(a),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    let sn = snap(&s);
    let c = &sn.counters;
    let connected = sn.nodes.iter().filter(|n| n.connected).count();
    let behind = sn.nodes.iter().filter(|n| n.behind > 0).count();
    let max_lag = sn.nodes.iter().map(|n| n.behind).max().unwrap_or(0);
    let failed = sn
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Failed)
        .count();
    let mut out = String::new();
    let mut m = |name: &str, kind: &str, help: &str, lines: &[(String, u64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    m(
        "shoal_nodes",
        "gauge",
        "Nodes known to this anchor.",
        &one(sn.nodes.len() as u64),
    );
    m(
        "shoal_connected_nodes",
        "gauge",
        "Nodes connected to this anchor.",
        &one(connected as u64),
    );
    m(
        "shoal_nodes_behind",
        "gauge",
        "Nodes that have not applied the latest desired state.",
        &one(behind as u64),
    );
    m(
        "shoal_nodes_failed",
        "gauge",
        "Nodes with a failed workload.",
        &one(failed as u64),
    );
    m(
        "shoal_lag_changes_max",
        "gauge",
        "Most fleet and site changes any node has not applied.",
        &one(max_lag as u64),
    );
    m(
        "shoal_sync_bytes_total",
        "counter",
        "Sync frame bytes.",
        &[
            ("{direction=\"in\"}".into(), c.sync_bytes_in),
            ("{direction=\"out\"}".into(), c.sync_bytes_out),
        ],
    );
    m(
        "shoal_sync_messages_total",
        "counter",
        "Sync frames.",
        &[
            ("{direction=\"in\"}".into(), c.sync_messages_in),
            ("{direction=\"out\"}".into(), c.sync_messages_out),
        ],
    );
    m(
        "shoal_security_events_total",
        "counter",
        "Refused changes, peers and requests.",
        &one(sn.security_total),
    );
    m(
        "shoal_conflicts",
        "gauge",
        "Fields with concurrent values.",
        &one(sn.conflicts.len() as u64),
    );
    // What came up from the nodes, and the exporter's progress.
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let mut counters: Vec<(&str, &str, &str, &AtomicU64)> = Vec::new();
    if let Some(d) = &s.data {
        counters.extend([
            (
                "shoal_data_batches_total",
                "counter",
                "Batches of data from the nodes landed and acknowledged.",
                &d.batches_landed,
            ),
            (
                "shoal_data_records_total",
                "counter",
                "Records in the batches landed (a replay counts again).",
                &d.records_landed,
            ),
            (
                "shoal_data_records_new_total",
                "counter",
                "Records landed that were not here yet.",
                &d.records_new,
            ),
            (
                "shoal_data_bytes_total",
                "counter",
                "Bytes of the batches landed (signatures and framing within).",
                &d.bytes_landed,
            ),
            (
                "shoal_data_refused_total",
                "counter",
                "Batches refused (forged, from a stranger, or not storable).",
                &d.refused,
            ),
        ]);
    }
    if let Some(x) = &s.export {
        counters.extend([
            (
                "shoal_export_records_total",
                "counter",
                "Records copied to PostgreSQL (a replay counts again).",
                &x.records,
            ),
            (
                "shoal_export_rows_total",
                "counter",
                "Rows new in PostgreSQL.",
                &x.rows,
            ),
            (
                "shoal_export_errors_total",
                "counter",
                "Export rounds that failed (database down, connection lost).",
                &x.errors,
            ),
            (
                "shoal_export_replayed_total",
                "counter",
                "Export rounds that found rows already in PostgreSQL and skipped them.",
                &x.replayed,
            ),
            (
                "shoal_export_backlog_batches",
                "gauge",
                "Batches landed and not yet copied to PostgreSQL.",
                &x.backlog,
            ),
        ]);
    }
    for (name, kind, help, v) in counters {
        m(name, kind, help, &one(v.load(Relaxed)));
    }
    m(
        "shoal_store_bytes",
        "gauge",
        "Size of the store file.",
        &one(c.store_bytes),
    );
    m(
        "shoal_documents",
        "gauge",
        "Documents held.",
        &one(c.documents as u64),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

fn no_demo() -> Response {
    ApiError::new(404, "demo controls exist only in `shoal demo`").into_response()
}

async fn demo(State(s): State<Shared>) -> Response {
    let Some(d) = &s.demo else { return no_demo() };
    axum::Json(d.status()).into_response()
}

async fn demo_set(s: &Server, site: &str, cut: bool) -> Response {
    let Some(d) = &s.demo else { return no_demo() };
    match d.set_cut(site, cut) {
        Ok(()) => axum::Json(json!({ "site": site, "cut": cut })).into_response(),
        Err(e) => ApiError::new(404, e).into_response(),
    }
}

async fn demo_cut(State(s): State<Shared>, Path(site): Path<String>) -> Response {
    demo_set(&s, &site, true).await
}

async fn demo_restore(State(s): State<Shared>, Path(site): Path<String>) -> Response {
    demo_set(&s, &site, false).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteEdit {
    config: String,
    key: String,
    value: String,
}

async fn demo_edit(State(s): State<Shared>, Path(site): Path<String>, bytes: Bytes) -> Response {
    let Some(d) = s.demo.clone() else {
        return no_demo();
    };
    let e: SiteEdit = match body(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let r = tokio::task::spawn_blocking(move || d.site_edit(&site, &e.config, &e.key, &e.value))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match r {
        Ok(()) => axum::Json(json!({ "ok": true })).into_response(),
        Err(e) => ApiError::new(502, e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_exactly_the_routes() -> anyhow::Result<()> {
        let doc: Value = serde_json::from_str(OPENAPI)?;
        let paths = doc["paths"]
            .as_object()
            .ok_or_else(|| anyhow::anyhow!("no paths"))?;
        let mut listed = Vec::new();
        for (p, ops) in paths {
            let ops = ops
                .as_object()
                .ok_or_else(|| anyhow::anyhow!("{p}: no operations"))?;
            for m in ops.keys() {
                listed.push((m.to_uppercase(), p.clone()));
            }
        }
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        listed.sort();
        routes.sort();
        assert_eq!(listed, routes);
        Ok(())
    }

    /// The router over the tokens of `dir`, its daemon gone (the command
    /// channel closed: a request that reaches it gets 503).
    fn router_without_daemon(dir: &std::path::Path) -> Router {
        let (_tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let (commands, closed) = mpsc::channel(16);
        drop(closed);
        router(Server {
            snapshot: rx,
            commands,
            tokens: Tokens::new(dir),
            demo: None,
            blobs: None,
            store: None,
            data: None,
            export: None,
            throttle: Throttle::default(),
        })
    }

    #[test]
    fn openapi_gives_each_route_the_role_the_router_checks() -> anyhow::Result<()> {
        let doc: Value = serde_json::from_str(OPENAPI)?;
        for (m, p, role) in ROUTES {
            let op = &doc["paths"][*p][m.to_lowercase()];
            let want = role.map_or("public", ApiRole::as_str);
            assert_eq!(op["x-shoal-role"], json!(want), "{m} {p}");
            assert_eq!(
                op["responses"].get("403").is_some(),
                role.is_some(),
                "{m} {p}: a 403 answer is documented exactly where a role is needed"
            );
        }
        Ok(())
    }

    /// Every route, with a token of every role: refused with 403 naming the
    /// role needed exactly when the token's role is below it. The daemon is
    /// gone (its command channel closed), so an admitted request ends in
    /// the handler's own answer (503 where it needs the daemon), never 401
    /// or 403.
    #[tokio::test]
    async fn every_route_admits_exactly_the_roles_it_names() -> anyhow::Result<()> {
        use tower::ServiceExt;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("root.key"), b"x")?;
        let mut tokens = BTreeMap::new();
        for r in ApiRole::ALL {
            let site = (r == ApiRole::SiteEngineer).then_some("north");
            let t = crate::tokens::create(dir.path(), r.as_str(), r, site, None, now())?;
            tokens.insert(r, t);
        }
        let app = router_without_daemon(dir.path());
        let mut checked = 0;
        for (m, p, needed) in ROUTES {
            let Some(needed) = needed else { continue };
            let uri = p
                .replace("{name}", "x")
                .replace("{series}", "s")
                .replace("{app}", "x")
                .replace("{action}", "pause")
                .replace("{what}", "apps")
                .replace("{site}", "north");
            for (role, token) in &tokens {
                let req = Request::builder()
                    .method(*m)
                    .uri(&uri)
                    .header(header::AUTHORIZATION, format!("Bearer {token}"))
                    .body(axum::body::Body::empty())?;
                let r = app.clone().oneshot(req).await?;
                let status = r.status().as_u16();
                if role < needed {
                    assert_eq!(status, 403, "{m} {p} as {role}");
                    let b = axum::body::to_bytes(r.into_body(), 1 << 16).await?;
                    let text = String::from_utf8_lossy(&b);
                    assert!(
                        text.contains(&format!("needs the {needed} role")),
                        "{m} {p} as {role}: {text}"
                    );
                } else {
                    assert!(
                        status != 403 && status != 401,
                        "{m} {p} as {role}: {status}"
                    );
                }
                checked += 1;
            }
        }
        assert!(checked >= 4 * 30, "{checked}");
        Ok(())
    }

    #[tokio::test]
    async fn a_site_engineer_applies_only_its_own_site() -> anyhow::Result<()> {
        use tower::ServiceExt;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("root.key"), b"x")?;
        let t = crate::tokens::create(
            dir.path(),
            "carol",
            ApiRole::SiteEngineer,
            Some("north"),
            None,
            now(),
        )?;
        let app = router_without_daemon(dir.path());
        let apply = |text: &'static str| {
            Request::builder()
                .method("POST")
                .uri("/api/apply")
                .header(header::AUTHORIZATION, format!("Bearer {t}"))
                .body(axum::body::Body::from(text))
        };
        let own =
            "apiVersion: shoal.dev/v1\nkind: SiteOverride\nmetadata: {name: north}\nspec: {}\n";
        let other =
            "apiVersion: shoal.dev/v1\nkind: SiteOverride\nmetadata: {name: south}\nspec: {}\n";
        let app_m = "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {name: meter}\nspec: {version: v1, native: {command: [/bin/true]}}\n";
        // Its own site's overrides reach the daemon (gone here: 503).
        let r = app.clone().oneshot(apply(own)?).await?;
        assert_eq!(r.status().as_u16(), 503);
        for (text, what) in [(other, "siteoverride/south"), (app_m, "app/meter")] {
            let r = app.clone().oneshot(apply(text)?).await?;
            assert_eq!(r.status().as_u16(), 403, "{what}");
            let b = axum::body::to_bytes(r.into_body(), 1 << 16).await?;
            let text = String::from_utf8_lossy(&b);
            assert!(text.contains(what) && text.contains("north"), "{text}");
        }
        Ok(())
    }

    /// Ten failed logins from one address in a minute hold its wrong tokens
    /// back (429) until the minute is over; a valid token from it still
    /// passes, and another address is not held back.
    #[tokio::test]
    async fn failed_logins_are_throttled_per_address() -> anyhow::Result<()> {
        use tower::ServiceExt;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("root.key"), b"x")?;
        let good = crate::tokens::create(dir.path(), "al", ApiRole::Viewer, None, None, now())?;
        let app = router_without_daemon(dir.path());
        let ask = |ip: [u8; 4], token: &str| {
            let mut req = Request::new(axum::body::Body::empty());
            *req.uri_mut() = axum::http::Uri::from_static("/api/overview");
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
                req.headers_mut().insert(header::AUTHORIZATION, v);
            }
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(SocketAddr::from((ip, 4000))));
            app.clone().oneshot(req)
        };
        let scanner = [10, 0, 0, 1];
        assert_eq!(ask(scanner, &good).await?.status().as_u16(), 200);
        for i in 0..FAILED_LOGINS_PER_MINUTE {
            let r = ask(scanner, "shoal-op-guess").await?;
            assert_eq!(r.status().as_u16(), 401, "attempt {i}");
        }
        assert_eq!(ask(scanner, &good).await?.status().as_u16(), 200);
        let r = ask(scanner, "shoal-op-guess").await?;
        assert_eq!(r.status().as_u16(), 429);
        assert!(r.headers().get(header::RETRY_AFTER).is_some());
        let b = axum::body::to_bytes(r.into_body(), 1 << 16).await?;
        assert!(String::from_utf8_lossy(&b).contains("10.0.0.1"));
        let other = ask([10, 0, 0, 2], "shoal-op-guess").await?;
        assert_eq!(other.status().as_u16(), 401);
        // The window ends a minute after the first failure.
        let t = Throttle::default();
        let ip = std::net::IpAddr::from(scanner);
        for _ in 0..FAILED_LOGINS_PER_MINUTE {
            t.failed(ip, 1_000);
        }
        assert_eq!(t.blocked(ip, 1_030), Some(30));
        assert_eq!(t.blocked(ip, 1_060), None);
        t.failed(ip, 1_060);
        assert_eq!(t.blocked(ip, 1_061), None, "a new window starts at one");
        let off = Throttle::new(0);
        for _ in 0..100 {
            off.failed(ip, 1_000);
        }
        assert_eq!(off.blocked(ip, 1_001), None, "0: no limit");
        Ok(())
    }

    #[test]
    fn tokens_come_from_bearer_or_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; shoal_session=shoal-op-1"),
        );
        assert_eq!(token_of(&h).as_deref(), Some("shoal-op-1"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer shoal-op-2"),
        );
        assert_eq!(token_of(&h).as_deref(), Some("shoal-op-2"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        assert_eq!(
            token_of(&h),
            None,
            "a wrong scheme is no token, not the cookie's"
        );
    }

    #[tokio::test]
    async fn reads_the_snapshot_holds_never_wait_for_the_loop() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (_tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        // A daemon that never answers a command.
        let (commands, _held) = mpsc::channel(1);
        let shared: Shared = Arc::new(Server {
            snapshot: rx,
            commands,
            tokens: crate::tokens::Tokens::new(dir.path()),
            demo: None,
            blobs: None,
            store: None,
            data: None,
            export: None,
            throttle: Throttle::default(),
        });
        for what in [
            "conflicts",
            "apps",
            "configs",
            "sites",
            "profiles",
            "devices",
        ] {
            let q = OutputQuery {
                output: Some("json".into()),
            };
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                cli_get(
                    State(shared.clone()),
                    axum::Extension(Operator("op".into(), ApiRole::Viewer, None, None)),
                    Path(what.to_string()),
                    Query(q),
                ),
            )
            .await
            .unwrap_or_else(|_| panic!("get {what} waited for the loop"));
            assert_eq!(r.status(), StatusCode::OK, "{what}");
        }
        Ok(())
    }

    #[test]
    fn bodies_name_the_field_at_fault() {
        let e = body::<ResolveBody>(br#"{"doc": "fleet", "field": 3, "value": 1}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.field.as_deref(), Some("field"));
        let e = body::<ApplyBody>(br#"{"files": [{"name": "a"}]}"#).unwrap_err();
        assert!(e.error.contains("text"), "{}", e.error);
        assert!(body::<Login>(b"\xff\x00").is_err());
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }
}

/// Entry points for the fuzz targets (`fuzz/fuzz_targets/api_requests.rs`):
/// every decoder the API runs on bytes from a client.
#[doc(hidden)]
pub mod fuzz {
    use super::*;

    /// Feeds `bytes` to the body, header and path decoders, and to the
    /// audit exchange's (a pull, an answer merged into a view); never
    /// panics.
    pub fn request_parts(bytes: &[u8]) {
        let _ = body::<Login>(bytes);
        let _ = body::<ApplyBody>(bytes);
        let _ = body::<ResolveBody>(bytes);
        let _ = body::<SiteEdit>(bytes);
        // `/shoal/audit/1` between anchor replicas: a pull and its answer.
        let _ = serde_json::from_slice::<crate::view::AuditMarks>(bytes);
        if let Ok(a) = serde_json::from_slice::<crate::daemon::AuditAnswer>(bytes) {
            let mut v = crate::View::new("fuzz");
            v.audit_merge(a.entries, 0);
            let _ = v.audit_since(&Default::default(), 1024);
        }
        if let Ok(text) = std::str::from_utf8(bytes) {
            let _ = percent_decode(text);
            let _ = NodeState::parse(text);
            let _ = crdt_state::fleet::manifest::parse("fuzz", text);
            if let Ok(v) = HeaderValue::from_str(text) {
                let mut h = HeaderMap::new();
                h.insert(header::AUTHORIZATION, v.clone());
                let _ = token_of(&h);
                let mut h = HeaderMap::new();
                h.insert(header::COOKIE, v);
                let _ = token_of(&h);
            }
        }
    }
}
