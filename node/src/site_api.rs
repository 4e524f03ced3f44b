//! The local site API: a node's view and its site document for the field
//! engineers of its site, on the substation LAN (`shoal node run
//! --site-api ADDR`).
//!
//! Authentication without clocks or passwords: the client fetches a
//! one-time nonce (`GET /api/challenge`), then signs
//! `"shoal/site-api/v1\0" method "\0" path "\0" nonce sha256(body)` with
//! its identity key and sends `Authorization: Shoal key=<hex>,nonce=<hex>,
//! sig=<hex>`. A missing, malformed or wrong signature, or an unknown or
//! used nonce, is 401; a valid signature of a key that is not a site
//! engineer of this node's site (or an operator), or is revoked, is 403.
//!
//! Edits are signed on the engineer's machine, never here: `shoal site
//! apply` fetches the site document's signed changes, applies the manifest
//! in a scratch data dir with the engineer's identity, and posts the new
//! signed changes; the node verifies them like any others and syncs them
//! on. The node never holds an engineer's key.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/challenge` | `{"nonce": hex}` (no authentication) |
//! | GET | `/api/view` | node, site, desired workloads, report, peers, site overrides |
//! | GET | `/api/site/bundle` | `{"bundle": hex}`: the site document's signed changes |
//! | POST | `/api/site/changes` | body: a bundle of the site document's new changes; `{"new": bool}` |
//!
//! Served over TLS with a certificate for the node's own key that carries
//! its Shoal certificate; the CLI accepts only a node of its engineer's
//! fleet and site (ADR 0014). Plain HTTP only with
//! `--site-api-insecure-http`.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use tracing::Instrument;

use anyhow::{Context, anyhow, bail};
use crdt_state::{DocId, Identity, PublicKey};
use daemon::command::{Answer, Caller, Command, Incoming};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

const DOMAIN: &[u8] = b"shoal/site-api/v1\0";
/// Largest request body (a bundle of new site changes).
pub const MAX_BODY: usize = 8 << 20;
const NONCE_LIFETIME: Duration = Duration::from_secs(120);
const MAX_NONCES: usize = 4096;

/// A request as the daemon sees it.
#[derive(Debug)]
pub struct Request {
    /// GET or POST.
    pub method: String,
    /// The path.
    pub path: String,
    /// The Authorization header.
    pub auth: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// The daemon's answer.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: serde_json::Value,
}

impl Reply {
    /// An error answer.
    pub fn error(status: u16, msg: impl Into<String>) -> Reply {
        Reply {
            status,
            body: serde_json::json!({ "error": msg.into() }),
        }
    }
}

/// What signs a request.
pub fn signing_message(method: &str, path: &str, nonce: &[u8; 32], body: &[u8]) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(method.as_bytes());
    m.push(0);
    m.extend_from_slice(path.as_bytes());
    m.push(0);
    m.extend_from_slice(nonce);
    m.extend_from_slice(&Sha256::digest(body));
    m
}

/// One-time nonces handed out by the node.
#[derive(Default)]
pub struct Nonces(HashMap<[u8; 32], Instant>);

impl Nonces {
    /// A fresh nonce.
    pub fn issue(&mut self) -> anyhow::Result<[u8; 32]> {
        let now = Instant::now();
        self.0
            .retain(|_, t| now.duration_since(*t) < NONCE_LIFETIME);
        if self.0.len() >= MAX_NONCES {
            bail!("too many outstanding challenges; try again");
        }
        let mut n = [0u8; 32];
        getrandom::fill(&mut n).map_err(|e| anyhow!("no randomness: {e}"))?;
        self.0.insert(n, now);
        Ok(n)
    }

    fn take(&mut self, n: &[u8; 32]) -> bool {
        match self.0.remove(n) {
            Some(t) => t.elapsed() < NONCE_LIFETIME,
            None => false,
        }
    }
}

fn field<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .trim()
        .strip_prefix("Shoal ")?
        .split(',')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

/// Authenticates a request's signature: 401 for anything but a valid
/// signature over a live nonce. Returns the key that signed; what that key
/// may do (a certified, unrevoked engineer of this node's site, or an
/// operator) is the daemon's to decide (`daemon::command::authorize`).
pub fn authenticate(req: &Request, nonces: &mut Nonces) -> Result<PublicKey, Reply> {
    let header = req
        .auth
        .as_deref()
        .ok_or_else(|| Reply::error(401, "authentication required (Authorization: Shoal …)"))?;
    let bad = || Reply::error(401, "malformed Authorization header");
    let key = field(header, "key").and_then(hex32).ok_or_else(bad)?;
    let nonce = field(header, "nonce").and_then(hex32).ok_or_else(bad)?;
    let sig: [u8; 64] = field(header, "sig")
        .and_then(|s| hex::decode(s).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    if !nonces.take(&nonce) {
        return Err(Reply::error(401, "unknown or used challenge"));
    }
    let vk = VerifyingKey::from_bytes(&key).map_err(|_| bad())?;
    let msg = signing_message(&req.method, &req.path, &nonce, &req.body);
    vk.verify(&msg, &Signature::from_bytes(&sig))
        .map_err(|_| Reply::error(401, "bad signature"))?;
    Ok(PublicKey(key))
}

/// The command a request asks for (`site`: this node's site), or 404.
pub fn command_of(req: &Request, site: &str) -> Result<Command, Reply> {
    let devices = req.path == "/api/devices" || req.path.starts_with("/api/devices/");
    Ok(match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/api/view") => Command::View,
        ("GET", "/api/site/bundle") => Command::Export {
            only: Some(DocId::Site(site.to_string()).to_string()),
        },
        ("POST", "/api/site/changes") => Command::Import {
            bundle: req.body.clone(),
            output: None,
        },
        ("GET", _) if devices => Command::Devices {
            path: req.path.clone(),
        },
        ("POST", DATA_PATH) => Command::Data {
            records: records_of(&req.body)?,
        },
        _ => return Err(Reply::error(404, format!("no {} {}", req.method, req.path))),
    })
}

/// Where an app posts its records.
pub const DATA_PATH: &str = "/v1/data";

/// The records of a `POST /v1/data` body: `{"records": [...]}`, or one
/// record alone; a body that is neither is refused, naming where.
fn records_of(body: &[u8]) -> Result<Vec<daemon::command::AppRecord>, Reply> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Many {
        records: Vec<daemon::command::AppRecord>,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Body {
        Many(Many),
        One(daemon::command::AppRecord),
    }
    let parsed: Body = serde_json::from_slice(body).map_err(|e| {
        Reply::error(
            400,
            format!("the body is not {{\"records\": [{{\"series\", \"time\", \"value\"}}, …]}} nor one such record: {e}"),
        )
    })?;
    Ok(match parsed {
        Body::Many(m) => m.records,
        Body::One(r) => vec![r],
    })
}

/// The token of app `app` on this node: `<app>.<HMAC-SHA256 of the app's
/// name under the node's app key, hex>`. It names the app, so the node
/// checks it without keeping a list; the key (`app-key`) is given to no
/// app, so an app cannot make another's.
pub fn app_token_for(secret: &str, app: &str) -> String {
    format!(
        "{app}.{}",
        hex::encode(hmac_sha256(secret.as_bytes(), app.as_bytes()))
    )
}

/// HMAC (RFC 2104) over SHA-256.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.map(|x| x ^ b);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// What the site API's server holds: the node's site, the way to its
/// daemon's commands, the challenges handed out, the apps' token.
pub struct Surface {
    /// This node's site (`None`: every request is 404).
    pub site: Option<String>,
    /// The daemon's one command surface.
    pub commands: mpsc::Sender<Incoming>,
    /// Device readings for the live stream.
    pub live: tokio::sync::broadcast::Sender<String>,
    /// The node's shared token: device reads only.
    pub app_token: Option<String>,
    /// The key of each app's own token ([`app_token_for`]).
    pub app_key: Option<String>,
    nonces: std::sync::Mutex<Nonces>,
}

impl Surface {
    /// A surface for a node of `site`.
    pub fn new(
        site: Option<String>,
        commands: mpsc::Sender<Incoming>,
        live: tokio::sync::broadcast::Sender<String>,
        app_token: Option<String>,
        app_key: Option<String>,
    ) -> Surface {
        Surface {
            site,
            commands,
            live,
            app_token,
            app_key,
            nonces: std::sync::Mutex::new(Nonces::default()),
        }
    }

    /// Answers one request: a challenge here; anything else authenticated
    /// here and handed to the daemon as a command.
    pub async fn answer(&self, req: Request) -> Reply {
        let Some(site) = self.site.as_deref() else {
            return Reply::error(404, "this node belongs to no site");
        };
        if (req.method.as_str(), req.path.as_str()) == ("GET", "/api/challenge") {
            let issued = match self.nonces.lock() {
                Ok(mut n) => n.issue(),
                Err(_) => Err(anyhow!("challenges unavailable")),
            };
            return match issued {
                Ok(n) => Reply {
                    status: 200,
                    body: serde_json::json!({ "nonce": hex::encode(n) }),
                },
                Err(e) => Reply::error(503, e.to_string()),
            };
        }
        let cmd = match command_of(&req, site) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let caller = match self.caller(&req, &cmd) {
            Ok(c) => c,
            Err(reply) => {
                tracing::warn!(path = %req.path, error = %reply.body, "site API request refused");
                return reply;
            }
        };
        let (tx, rx) = oneshot::channel();
        if self.commands.send((caller, cmd, tx)).await.is_err() {
            return Reply::error(503, "the node is stopping");
        }
        match rx.await {
            Ok(Ok(Answer::Json(body))) => Reply { status: 200, body },
            Ok(Ok(Answer::Bytes(b))) => Reply {
                status: 200,
                body: serde_json::json!({ "bundle": hex::encode(b) }),
            },
            Ok(Ok(Answer::Text(t))) => Reply {
                status: 200,
                body: serde_json::json!({ "text": t }),
            },
            Ok(Ok(Answer::Blocking(_))) => Reply::error(500, "internal: a store read was not run"),
            Ok(Err(r)) => {
                if matches!(r.status, 401 | 403) {
                    tracing::warn!(path = %req.path, error = %r.error, "site API request refused");
                }
                Reply::error(r.status, r.error)
            }
            Err(_) => Reply::error(503, "the node is stopping"),
        }
    }

    /// Who makes a request: one of the node's apps (its token, on the
    /// device routes) or the key that signed it.
    fn caller(&self, req: &Request, cmd: &Command) -> Result<Caller, Reply> {
        let app_route = matches!(cmd, Command::Devices { .. } | Command::Data { .. });
        if app_route
            && let Some(given) = req.auth.as_deref().and_then(|h| h.strip_prefix("Bearer "))
            && (self.app_token.is_some() || self.app_key.is_some())
        {
            let given = given.trim();
            // Compared as digests: no early exit on the first differing byte.
            let same =
                |a: &str, b: &str| Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes());
            if let (Some(key), Some((app, _))) = (&self.app_key, given.rsplit_once('.'))
                && same(given, &app_token_for(key, app))
            {
                return Ok(Caller::App(Some(app.to_string())));
            }
            if let Some(t) = &self.app_token
                && same(given, t)
            {
                return Ok(Caller::App(None));
            }
            return Err(Reply::error(401, "unknown app token"));
        }
        if matches!(cmd, Command::Data { .. }) {
            return Err(Reply::error(
                401,
                "data is posted with an app's token (Authorization: Bearer $SHOAL_APP_TOKEN)",
            ));
        }
        let mut nonces = self
            .nonces
            .lock()
            .map_err(|_| Reply::error(503, "challenges unavailable"))?;
        authenticate(req, &mut nonces).map(Caller::Signed)
    }
}

/// The path of the live stream of device readings: one JSON line per poll
/// of a device (`{"device", "at_ms", "values"}`), for as long as the
/// client reads. Authenticated like every other request.
pub const LIVE_PATH: &str = "/api/devices/stream";

/// Serves the site API on `addr`: each request is authenticated here and
/// handed to the daemon as a command; the live stream of readings is
/// served from `surface.live`.
pub async fn serve(
    addr: std::net::SocketAddr,
    surface: Surface,
    tls: Option<std::sync::Arc<daemon::tls::ServerConfig>>,
) -> anyhow::Result<std::net::SocketAddr> {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("site API on {addr}"))?;
    let local = listener.local_addr()?;
    let surface = std::sync::Arc::new(surface);
    let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let surface = surface.clone();
        async move {
            let streaming = method == Method::GET && uri.path() == LIVE_PATH;
            let req = Request {
                method: method.as_str().to_string(),
                path: uri.path().to_string(),
                auth: headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from),
                body: body.to_vec(),
            };
            let reply = surface.answer(req).await;
            let status =
                StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if streaming && reply.status == 200 {
                // Authenticated: follow the readings until the client goes.
                let rx = surface.live.subscribe();
                let lines = futures::stream::unfold(rx, |mut rx| async move {
                    let line = match rx.recv().await {
                        Ok(l) => l,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            format!("{{\"lagged\":{n}}}")
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    };
                    Some((Ok::<_, std::convert::Infallible>(format!("{line}\n")), rx))
                });
                return (
                    status,
                    [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
                    axum::body::Body::from_stream(lines),
                )
                    .into_response();
            }
            (status, axum::Json(reply.body)).into_response()
        }
    };
    let app = axum::Router::new()
        .fallback(handler)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY));
    let span = tracing::info_span!("site_api", %local);
    match tls {
        Some(config) => {
            let listener = daemon::tls::TlsListener::new(listener, config)?;
            tokio::spawn(
                async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "site API stopped");
                    }
                }
                .instrument(span),
            );
        }
        None => {
            tokio::spawn(
                async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "site API stopped");
                    }
                }
                .instrument(span),
            );
        }
    }
    Ok(local)
}

/// A signed client of a node's site API. Over `https://` it accepts only
/// a node of its identity's fleet and site (`daemon::tls::NodeVerifier`,
/// ADR 0014).
pub struct Client {
    base: String,
    identity: Identity,
    agent: ureq::Agent,
    verifier: Option<std::sync::Arc<daemon::tls::NodeVerifier>>,
}

impl Client {
    /// A client for the node at `base` (`https://host:port`, or
    /// `http://` for a site API served with `--site-api-insecure-http`).
    pub fn new(base: &str, identity: Identity) -> Client {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        let verifier = base.starts_with("https://").then(|| {
            std::sync::Arc::new(daemon::tls::NodeVerifier::new(
                identity.cert.root(),
                identity.cert.site.clone(),
            ))
        });
        Client {
            base: base.trim_end_matches('/').to_string(),
            identity,
            agent,
            verifier,
        }
    }

    /// Over `https://`, accepts any node of the fleet `root` instead of
    /// only nodes of the identity's own fleet and site: for tests of what
    /// the node itself refuses.
    pub fn trusting_any_node_of(mut self, root: crdt_state::PublicKey) -> Client {
        if self.verifier.is_some() {
            self.verifier = Some(std::sync::Arc::new(daemon::tls::NodeVerifier::new(
                root, None,
            )));
        }
        self
    }

    fn nonce(&self) -> anyhow::Result<[u8; 32]> {
        let v = self.call("GET", "/api/challenge", None, Vec::new())?;
        v["nonce"]
            .as_str()
            .and_then(hex32)
            .ok_or_else(|| anyhow!("the node answered no challenge"))
    }

    fn auth(&self, method: &str, path: &str, nonce: &[u8; 32], body: &[u8]) -> String {
        let sig = self
            .identity
            .sign(&signing_message(method, path, nonce, body));
        format!(
            "Shoal key={},nonce={},sig={}",
            self.identity.key().to_hex(),
            hex::encode(nonce),
            hex::encode(sig)
        )
    }

    /// One request: the status and the body, or with `lines` the body
    /// line by line until `lines` returns false.
    fn send(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Vec<u8>,
        lines: Option<&mut dyn FnMut(&str) -> bool>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        use std::io::{BufRead, Read};
        let url = format!("{}{path}", self.base);
        if let Some(verifier) = &self.verifier {
            let mut headers = vec![("Content-Type", "application/octet-stream")];
            if let Some(a) = auth {
                headers.push(("Authorization", a));
            }
            return daemon::tls::request(verifier.clone(), method, &url, &headers, &body, lines);
        }
        let mut resp = if method == "POST" {
            let mut r = self.agent.post(&url);
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.send(&body[..])
        } else {
            let mut r = self.agent.get(&url);
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        .map_err(|e| anyhow!("{url}: {e}"))?;
        let status = resp.status().as_u16();
        if let Some(f) = lines
            && status == 200
        {
            let reader = std::io::BufReader::new(resp.into_body().into_reader());
            for line in reader.lines() {
                let line = line.map_err(|e| anyhow!("{url}: {e}"))?;
                if !f(&line) {
                    break;
                }
            }
            return Ok((status, Vec::new()));
        }
        let mut out = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(MAX_BODY as u64 * 3)
            .read_to_end(&mut out)
            .map_err(|e| anyhow!("{url}: {e}"))?;
        Ok((status, out))
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        nonce: Option<[u8; 32]>,
        body: Vec<u8>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let auth = nonce.map(|n| self.auth(method, path, &n, &body));
        let (status, text) = self.send(method, path, auth.as_deref(), body, None)?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|_| anyhow!("{url}: answered {status} with no JSON"))?;
        if status >= 400 {
            bail!(
                "{url}: {status}: {}",
                v["error"].as_str().unwrap_or("refused")
            );
        }
        Ok(v)
    }

    /// Follows a streaming route: calls `f` with every line until it
    /// returns false or the node ends the stream.
    pub fn follow(&self, path: &str, mut f: impl FnMut(&str) -> bool) -> anyhow::Result<()> {
        let n = self.nonce()?;
        let auth = self.auth("GET", path, &n, &[]);
        let (status, _) = self.send("GET", path, Some(&auth), Vec::new(), Some(&mut f))?;
        if status != 200 {
            bail!("{}{path}: {status}", self.base);
        }
        Ok(())
    }

    /// An authenticated GET.
    pub fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let n = self.nonce()?;
        self.call("GET", path, Some(n), Vec::new())
    }

    /// An authenticated POST.
    pub fn post(&self, path: &str, body: Vec<u8>) -> anyhow::Result<serde_json::Value> {
        let n = self.nonce()?;
        self.call("POST", path, Some(n), body)
    }
}

/// `shoal site apply`: signs the manifests' edits of the engineer's site
/// here and posts them to the node. Returns what was applied.
pub fn apply(
    node: &str,
    identity_file: &std::path::Path,
    manifests: &[crdt_state::fleet::manifest::Manifest],
) -> anyhow::Result<Vec<crdt_state::local::datadir::Applied>> {
    let identity = Identity::read(identity_file)?;
    let site = identity.cert.site.clone().ok_or_else(|| {
        anyhow!(
            "{} has no site: it is not a site engineer's identity",
            identity_file.display()
        )
    })?;
    let client = Client::new(node, identity);
    let v = client.get("/api/site/bundle")?;
    let bundle = hex::decode(v["bundle"].as_str().unwrap_or_default())
        .map_err(|_| anyhow!("the node sent a damaged bundle"))?;
    for m in manifests {
        if m.kind() != crdt_state::fleet::model::Kind::SiteOverride || m.name != site {
            bail!(
                "{} {}: only the SiteOverride of site {site} can be applied through a node",
                m.kind().as_str(),
                m.name
            );
        }
    }
    let (applied, changes) =
        crdt_state::local::datadir::edit_offline(&bundle, identity_file, |dd| {
            dd.apply(manifests, now())
        })?;
    if let Some(changes) = changes {
        client.post("/api/site/changes", changes)?;
    }
    Ok(applied)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
