//! The one command surface of a running daemon.
//!
//! Every request that reaches a node or an anchor from outside the mesh is a
//! [`Command`] from a [`Caller`]: a CLI verb over the control socket
//! (`Caller::Owner`), an operator API call (`Caller::Operator`), a site API
//! call signed by an engineer (`Caller::Signed`) or made by one of the
//! node's apps (`Caller::App`). Each surface only authenticates and
//! translates; [`handle`] checks what the caller may do ([`authorize`]),
//! writes through the core's one write path, and answers. Writes are
//! answered once they are committed (the driver holds the answer); reads of
//! committed documents and writes of files ([`Answer::Blocking`]) run on a
//! blocking thread, never on the loop.
//!
//! What only one composition answers (the node's view and device routes)
//! goes to its [`Host::local`].

use std::collections::BTreeMap;

use crdt_state::fleet::model::Kind;
use crdt_state::local::datadir::{self, ImportReport, Reader};
use crdt_state::{Certificate, DocId, Identity, PublicKey, Role, Store, Trust};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::driver::Base;
use crate::enroll::TokenRequest;
use crate::render::{self, Contact, Format};

/// Everything a daemon can be asked.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// `shoal apply`, `POST /api/apply`: manifests as (file name, text).
    Apply {
        /// The files.
        files: Vec<(String, String)>,
        /// An identity file's content to sign with (the owner only).
        identity: Option<String>,
        /// Answer as text in this format; JSON when absent.
        output: Option<String>,
    },
    /// `shoal delete`, `DELETE /api/{kind}s/{name}`.
    Delete {
        /// app, config, node, site, profile or device.
        kind: String,
        /// Name.
        name: String,
        /// An identity file's content to sign with (the owner only).
        identity: Option<String>,
        /// Answer as a line of text; JSON when absent.
        output: Option<String>,
    },
    /// `POST /api/conflicts/resolve`: write `value` over concurrent values.
    Resolve {
        /// The document (`fleet`, `site/<name>`).
        doc: String,
        /// The field.
        field: String,
        /// The value chosen.
        value: Value,
    },
    /// `shoal get WHAT -o FORMAT`.
    Get {
        /// apps, configs, nodes, sites, profiles, devices or conflicts.
        what: String,
        /// Output format.
        output: String,
    },
    /// `shoal identity revoke`.
    Revoke {
        /// Name or key.
        who: String,
        /// Why.
        reason: String,
    },
    /// `shoal fleet token create`.
    TokenCreate(TokenRequest),
    /// `shoal bundle export`, `GET /api/site/bundle`, `GET /api/bundle`:
    /// the signed changes of every document, or of some.
    Export {
        /// Only these documents (`fleet,site/<name>`).
        only: Option<String>,
    },
    /// `shoal bundle import`, `POST /api/site/changes`: signed changes made
    /// elsewhere, verified like synced ones.
    Import {
        /// The bundle.
        #[serde(with = "hex_bytes")]
        bundle: Vec<u8>,
        /// Answer as text lines; JSON when absent.
        output: Option<String>,
    },
    /// `shoal rollout status|pause|resume|abort APP`,
    /// `GET /api/rollouts/{app}`, `POST /api/rollouts/{app}/{action}`.
    Rollout {
        /// The app.
        app: String,
        /// `status`, `pause`, `resume` or `abort`.
        action: String,
        /// Answer as text in this format; JSON when absent.
        output: Option<String>,
    },
    /// `POST /api/prepare`: what an edit (an `Apply`, `Delete`, `Resolve`
    /// or a rollout's `pause`, `resume` or `abort`) would write, and, for
    /// `key`, the unsigned changes that write it as that key, for the key's
    /// holder (an operator's browser) to check and sign; writes nothing
    /// (ADR 0015).
    Prepare {
        /// The edit.
        edit: Box<Command>,
        /// Whose changes to make.
        key: Option<PublicKey>,
    },
    /// `POST /api/keys/…`: publishes in the fleet document a certificate
    /// the fleet root issued for an operator's or a site engineer's
    /// browser key (ADR 0015). The certificate is checked against the root;
    /// the daemon only publishes it.
    Certify(Box<Certificate>),
    /// `GET /api/view` on a node's site API.
    View,
    /// A node's device routes (`/api/devices…` on the site API).
    Devices {
        /// The path.
        path: String,
    },
    /// `POST /v1/data` on a node's site API: records an app stores on the
    /// node, to go up like device readings.
    Data {
        /// At least one.
        records: Vec<AppRecord>,
    },
    /// A request a surface refused, for the security log.
    Security {
        /// Who asked.
        source: String,
        /// What was refused.
        reason: String,
    },
    /// An operator logged in to the web UI (for the timeline).
    Login {
        /// The token's role.
        role: String,
    },
    /// Something a surface saw, for the timeline (an operator token made
    /// or revoked on the anchor's host).
    Audit {
        /// Its kind.
        kind: String,
        /// What it concerns.
        subject: String,
        /// Words for people.
        text: String,
    },
}

impl Command {
    /// The command's name, for errors and logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Apply { .. } => "apply",
            Command::Delete { .. } => "delete",
            Command::Resolve { .. } => "resolve",
            Command::Get { .. } => "get",
            Command::Revoke { .. } => "revoke",
            Command::TokenCreate(_) => "token create",
            Command::Export { .. } => "export",
            Command::Import { .. } => "import",
            Command::Rollout { .. } => "rollout",
            Command::Prepare { .. } => "prepare",
            Command::Certify(_) => "certify",
            Command::View => "view",
            Command::Devices { .. } => "devices",
            Command::Data { .. } => "post data",
            Command::Security { .. } => "security",
            Command::Login { .. } => "login",
            Command::Audit { .. } => "audit",
        }
    }
}

/// One record an app posts: its series (under the app's own
/// `app/<app>/`), its time (ms since the epoch; the node's clock when
/// absent) and any JSON value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRecord {
    /// The series, within the app's (`defects`, `line-2/temperature`).
    pub series: String,
    /// Milliseconds since the epoch.
    #[serde(default)]
    pub time: Option<u64>,
    /// The value.
    pub value: Value,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(|_| serde::de::Error::custom("bundle bytes damaged in transit"))
    }
}

/// Who asks, as the surface authenticated them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The data dir's owner: the control socket (owner-only file).
    Owner,
    /// An operator holding an anchor API token: the token's name, and the
    /// client's address when known (for the audit trail).
    Operator(String, Option<String>),
    /// A key that signed a site API request over a fresh nonce; what it may
    /// do is decided by its certificate, in [`authorize`].
    Signed(PublicKey),
    /// One of this node's apps: with its own token (`Some(app)`), device
    /// reads and data records of its own series; with the node's shared
    /// token of before (`None`), device reads only.
    App(Option<String>),
    /// A surface itself, reporting a request it refused (security log only).
    Surface(String),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Owner => write!(f, "owner"),
            Caller::Operator(n, _) => write!(f, "operator {n}"),
            Caller::Signed(k) => write!(f, "key {}", k.short()),
            Caller::App(None) => write!(f, "app"),
            Caller::App(Some(a)) => write!(f, "app {a}"),
            Caller::Surface(s) => write!(f, "{s}"),
        }
    }
}

/// Work for a blocking thread (a read of committed documents, a file to
/// write); its result is the answer.
pub type BlockingJob = Box<dyn FnOnce(&Store) -> Result<Answer, Refusal> + Send>;

/// What a command answers.
pub enum Answer {
    /// Text (what the CLI prints).
    Text(String),
    /// JSON.
    Json(Value),
    /// Bytes (an exported bundle).
    Bytes(Vec<u8>),
    /// Work for the driver to run off the loop (a read of the store, a
    /// file to write); its result is the answer.
    Blocking(BlockingJob),
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Text(t) => f.debug_tuple("Text").field(t).finish(),
            Answer::Json(v) => f.debug_tuple("Json").field(v).finish(),
            Answer::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Answer::Blocking(_) => write!(f, "Blocking(..)"),
        }
    }
}

/// A refused or failed command: a status (HTTP's numbers) and words naming
/// what was wrong.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// 400 bad input, 401 unknown caller, 403 not allowed, 404 no such
    /// thing, 409 conflict, 500 failure here, 503 stopping.
    #[serde(skip)]
    pub status: u16,
    /// The whole message.
    pub error: String,
    /// Manifest file at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Position of the YAML document in it (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<usize>,
    /// Dotted path of the field at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Refusal {
    /// A refusal with a status.
    pub fn new(status: u16, error: impl Into<String>) -> Refusal {
        Refusal {
            status,
            error: error.into(),
            ..Refusal::default()
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)
    }
}

impl From<crdt_state::Error> for Refusal {
    fn from(e: crdt_state::Error) -> Refusal {
        use crdt_state::Error as E;
        match e {
            E::Manifest(m) => Refusal {
                status: 400,
                error: m.to_string(),
                file: Some(m.file.clone()),
                document: Some(m.document),
                field: Some(m.field.clone()).filter(|f| !f.is_empty()),
            },
            E::NotAllowed(_) | E::Rejected { .. } => Refusal::new(403, e.to_string()),
            E::NotFound(_) => Refusal::new(404, e.to_string()),
            E::Bundle(_) | E::Identity(_) | E::Automerge(_) => Refusal::new(400, e.to_string()),
            other => Refusal::new(500, other.to_string()),
        }
    }
}

impl From<anyhow::Error> for Refusal {
    fn from(e: anyhow::Error) -> Refusal {
        match e.downcast::<crdt_state::Error>() {
            Ok(e) => e.into(),
            Err(e) => Refusal::new(400, format!("{e:#}").replace('\n', " ")),
        }
    }
}

/// A command from a surface, with the channel for its answer (never an
/// [`Answer::Blocking`]: the driver runs those).
pub type Incoming = (
    Caller,
    Command,
    tokio::sync::oneshot::Sender<Result<Answer, Refusal>>,
);

/// A composition (the edge node, the anchor) around its [`Base`]: what
/// [`handle`] needs beyond the shared driver.
pub trait Host {
    /// The shared driver.
    fn base(&mut self) -> &mut Base;

    /// A command only this composition answers (the node's view and device
    /// routes). Called after [`authorize`].
    fn local(&mut self, caller: &Caller, cmd: Command) -> Result<Answer, Refusal> {
        let _ = caller;
        Err(Refusal::new(
            404,
            format!("{} is not answered by this daemon", cmd.verb()),
        ))
    }

    /// `shoal get nodes` from what this composition keeps in memory (the
    /// anchor's view of every node's report); `None` reads the store.
    fn nodes(&mut self, output: Format) -> Option<String> {
        let _ = output;
        None
    }

    /// Something for the timeline (an edit, an enrollment).
    fn event(&mut self, kind: &str, subject: &str, text: String) {
        let _ = (kind, subject, text);
    }

    /// Something `caller` did, for the timeline: the anchor records who
    /// and from where.
    fn event_by(&mut self, caller: &Caller, kind: &str, subject: &str, text: String) {
        let _ = caller;
        self.event(kind, subject, text);
    }

    /// A refused request, for the security log.
    fn security(&mut self, who: &str, reason: &str) {
        let _ = (who, reason);
    }
}

impl Host for Base {
    fn base(&mut self) -> &mut Base {
        self
    }
}

/// Handles one command: its caller's authority first, then the command.
pub fn handle<H: Host>(host: &mut H, caller: &Caller, cmd: Command) -> Result<Answer, Refusal> {
    {
        let core = &host.base().core;
        authorize(core.trust(), &core.me().cert, caller, &cmd)?;
    }
    match cmd {
        Command::Apply {
            files,
            identity,
            output,
        } => {
            let output = output.as_deref().map(format).transpose()?;
            let manifests = manifests(&files)?;
            let (writer, message, who) = writer_of(host.base(), caller, identity.as_deref())?;
            let applied = host.base().apply(&manifests, &writer, message.as_deref())?;
            for a in applied.iter().filter(|a| a.fields > 0) {
                host.event_by(
                    caller,
                    "edit",
                    &a.doc,
                    format!(
                        "{who} applied {}/{} ({} fields)",
                        a.kind.as_str().to_lowercase(),
                        a.name,
                        a.fields
                    ),
                );
            }
            Ok(match output {
                Some(f) => Answer::Text(render::applied(f, &applied)),
                None => Answer::Json(json!({ "applied": applied })),
            })
        }
        Command::Delete {
            kind,
            name,
            identity,
            output,
        } => {
            let k = kind_of(&kind)?;
            let (writer, message, who) = writer_of(host.base(), caller, identity.as_deref())?;
            let n = host.base().delete(k, &name, &writer, message.as_deref())?;
            let what = format!("{}/{name}", k.as_str().to_lowercase());
            host.event_by(caller, "edit", &what, format!("{who} deleted {what}"));
            Ok(match output {
                Some(_) => Answer::Text(deleted(k, &name)),
                None => Answer::Json(json!({ "deleted": what, "fields": n })),
            })
        }
        Command::Resolve { doc, field, value } => {
            let (id, ops) = resolve_ops(&doc, &field, &value)?;
            let (writer, message, who) = writer_of(host.base(), caller, None)?;
            let message =
                message.map(|_| format!("{who} resolved a conflict through the anchor API"));
            host.base().write(&id, &ops, &writer, message.as_deref())?;
            host.event_by(
                caller,
                "edit",
                &doc,
                format!("{who} resolved {field} in {doc}: {value} kept"),
            );
            Ok(Answer::Json(json!({ "resolved": field, "value": value })))
        }
        Command::Get { what, output } => {
            let output = format(&output)?;
            if matches!(what.as_str(), "nodes" | "node")
                && let Some(text) = host.nodes(output)
            {
                return Ok(Answer::Text(text));
            }
            let base = host.base();
            let trust = base.core.trust().clone();
            let contacts = base.core.contacts().clone();
            // Checked here, so a wrong name is answered at once.
            get_kind(&what)?;
            Ok(Answer::Blocking(Box::new(move |store| {
                let reader = Reader {
                    store,
                    trust: &trust,
                };
                get(&reader, &what, output, Some(&contacts), unix_now())
                    .map(Answer::Text)
                    .map_err(Refusal::from)
            })))
        }
        Command::Rollout {
            app,
            action,
            output,
        } => {
            let output = output.as_deref().map(format).transpose()?;
            let now = host.base().now();
            if action == "status" {
                let status = host
                    .base()
                    .core
                    .rollout_status(&app, now)
                    .ok_or_else(|| no_rollout(&app))?;
                return Ok(rollout_answer(&status, output));
            }
            let (writer, message, who) = writer_of(host.base(), caller, None)?;
            let (fleet, _) = host.base().core.desired();
            let empty = crdt_state::Document::new(DocId::Fleet);
            let doc = host.base().core.doc(&DocId::Fleet).unwrap_or(&empty);
            let (ops, text) = rollout_ops(doc, &fleet, &app, &action, &who, now.unix_s)?;
            if !ops.is_empty() {
                host.base()
                    .write(&DocId::Fleet, &ops, &writer, message.as_deref())?;
                host.event_by(
                    caller,
                    "rollout",
                    &format!("app {app}"),
                    format!("{who}: {text}"),
                );
            }
            Ok(match output {
                Some(_) => Answer::Text(format!("{text}\n")),
                None => Answer::Json(json!({ "rollout": app, "action": action, "result": text })),
            })
        }
        Command::Prepare { edit, key } => {
            let who = match caller {
                Caller::Operator(user, _) => user.clone(),
                _ => host.base().identity()?.cert.name,
            };
            prepare(host.base(), &edit, key, &who)
        }
        Command::Certify(cert) => {
            if !matches!(cert.role, Role::Operator | Role::SiteEngineer) {
                return Err(Refusal::new(
                    400,
                    format!(
                        "a browser key is an operator's or a site engineer's, not a {}'s",
                        cert.role
                    ),
                ));
            }
            let base = host.base();
            base.core
                .trust()
                .check(&cert)
                .map_err(|e| Refusal::new(400, format!("certificate: {e}")))?;
            let writer = base.publisher();
            base.write(&DocId::Fleet, &datadir::cert_ops(&cert), &writer, None)?;
            let site = cert
                .site
                .as_deref()
                .map(|s| format!(" of {s}"))
                .unwrap_or_default();
            host.event_by(
                caller,
                "certified",
                &cert.key.short(),
                format!(
                    "browser key of {} ({}{site}) certified by the fleet root",
                    cert.name, cert.role
                ),
            );
            Ok(Answer::Json(json!({ "certificate": cert })))
        }
        Command::Revoke { who, reason } => {
            let base = host.base();
            let key = datadir::find_key(base.core.trust(), &who)?;
            let writer = base.identity()?;
            let r = base.revoke(key, &reason, &writer)?;
            host.event_by(
                caller,
                "revoked",
                &key.short(),
                format!("{who} revoked: {reason}"),
            );
            Ok(Answer::Text(revoked(key, &r)))
        }
        Command::TokenCreate(t) => {
            let base = host.base();
            let addrs = base.addrs().to_vec();
            let addrs = if addrs.is_empty() {
                crate::enroll::read_addrs(base.dd.path())
            } else {
                addrs
            };
            let dir = base.dd.path().to_path_buf();
            let root = base.core.trust().root();
            let grantor = base.dd.identity().cloned();
            // A file written and synced: off the loop.
            Ok(Answer::Blocking(Box::new(move |_| {
                let token = crate::enroll::create_token(
                    &dir,
                    &root,
                    addrs,
                    &t,
                    grantor.as_ref(),
                    unix_now(),
                )?;
                Ok(Answer::Text(format!("{token}\n")))
            })))
        }
        Command::Export { only } => {
            let only = only_docs(only.as_deref())?;
            let trust = host.base().core.trust().clone();
            Ok(Answer::Blocking(Box::new(move |store| {
                let reader = Reader {
                    store,
                    trust: &trust,
                };
                let bytes =
                    reader.export_some(|id| only.as_ref().is_none_or(|o| o.contains(id)))?;
                Ok(Answer::Bytes(bytes))
            })))
        }
        Command::Import { bundle, output } => {
            // A site engineer edits their site's document, nothing else.
            let only = match caller {
                Caller::Signed(_) => Some(site_of(&host.base().core.me().cert)?),
                _ => None,
            };
            let report = host.base().import(&bundle, only.as_ref())?;
            if let Caller::Operator(user, _) = caller {
                // Who signed them is on the "merged" entry the core writes.
                for (doc, n) in &report.new_changes {
                    host.event_by(
                        caller,
                        "edit",
                        doc,
                        format!("{user} posted {n} signed change(s) to {doc}"),
                    );
                }
            }
            Ok(match output {
                Some(_) => Answer::Text(imported(&report)),
                None => Answer::Json(json!({
                    "new": !report.new_changes.is_empty(),
                    "new_changes": report.new_changes,
                    "waiting": report.waiting,
                })),
            })
        }
        Command::Audit {
            kind,
            subject,
            text,
        } => {
            host.event_by(caller, &kind, &subject, text);
            Ok(Answer::Json(json!({})))
        }
        Command::Login { role } => {
            if let Caller::Operator(name, _) = caller {
                host.event_by(
                    caller,
                    "login",
                    name,
                    format!("{name} logged in to the web UI ({role})"),
                );
            }
            Ok(Answer::Json(json!({})))
        }
        Command::Security { source, reason } => {
            tracing::warn!(%source, %reason, "request refused");
            host.security(&source, &reason);
            Ok(Answer::Json(json!({})))
        }
        cmd @ (Command::View | Command::Devices { .. } | Command::Data { .. }) => {
            host.local(caller, cmd)
        }
    }
}

/// What `caller` may ask. The owner of the data dir may ask anything; an
/// operator (an anchor API token) edits and reads; a signed site API
/// request must come from a certified, unrevoked key that may edit this
/// node's site (its site engineers, and operators), and may read the view,
/// the site document and the devices and post changes of the site
/// document; a node's app reads its devices.
///
/// `me` is this daemon's certificate (its site), `trust` the fleet's
/// certificates and revocations as the daemon holds them now.
pub fn authorize(
    trust: &Trust,
    me: &Certificate,
    caller: &Caller,
    cmd: &Command,
) -> Result<(), Refusal> {
    let refuse = |who: &str| Refusal::new(403, format!("{who} may not {} here", cmd.verb()));
    match caller {
        Caller::Owner => Ok(()),
        Caller::Operator(name, _) => match cmd {
            Command::Apply { identity: None, .. }
            | Command::Delete { identity: None, .. }
            | Command::Resolve { .. }
            | Command::Get { .. }
            | Command::Rollout { .. }
            | Command::Prepare { .. }
            | Command::Certify(_)
            | Command::Audit { .. }
            | Command::Export { .. }
            | Command::Import { .. }
            | Command::Login { .. }
            | Command::Security { .. } => Ok(()),
            _ => Err(refuse(&format!("operator {name} (an API token)"))),
        },
        Caller::Signed(key) => {
            let site = site_of(me)?;
            let cert = trust
                .cert(key)
                .ok_or_else(|| Refusal::new(401, "no certificate of this fleet for that key"))?;
            if trust.is_revoked(key) {
                return Err(Refusal::new(403, format!("{} is revoked", cert.name)));
            }
            let name = me.site.as_deref().unwrap_or_default();
            if !cert.may_write(&site) {
                return Err(Refusal::new(
                    403,
                    format!("{} ({}) may not edit site {name}", cert.name, cert.role),
                ));
            }
            match cmd {
                Command::View | Command::Devices { .. } | Command::Import { .. } => Ok(()),
                Command::Export { only: Some(d) } if *d == site.to_string() => Ok(()),
                _ => Err(refuse(&cert.name)),
            }
        }
        Caller::App(app) => match (cmd, app) {
            (Command::Devices { .. }, _) => Ok(()),
            (Command::Data { .. }, Some(_)) => Ok(()),
            (Command::Data { .. }, None) => Err(Refusal::new(
                403,
                "data is posted with the app's own token (SHOAL_APP_TOKEN as the node gives it to that app)",
            )),
            _ => Err(refuse("an app")),
        },
        Caller::Surface(s) => match cmd {
            Command::Security { .. } | Command::Audit { .. } => Ok(()),
            _ => Err(refuse(s)),
        },
    }
}

/// The documents an export names: `fleet,site/north` (all when absent).
pub fn only_docs(only: Option<&str>) -> Result<Option<Vec<DocId>>, Refusal> {
    only.map(|list| {
        list.split(',')
            .map(|d| DocId::parse(d.trim()).map_err(|e| Refusal::new(400, format!("only: {e}"))))
            .collect()
    })
    .transpose()
}

/// This node's site document (404 on a daemon that belongs to no site).
fn site_of(me: &Certificate) -> Result<DocId, Refusal> {
    me.site
        .clone()
        .map(DocId::Site)
        .ok_or_else(|| Refusal::new(404, "this node belongs to no site"))
}

/// Who signs a write for `caller`, the message recorded with it, and the
/// name the timeline gives.
fn writer_of(
    base: &Base,
    caller: &Caller,
    identity: Option<&str>,
) -> Result<(Identity, Option<String>, String), Refusal> {
    match caller {
        Caller::Owner => {
            let id = match identity {
                Some(text) => parse_identity(text)?,
                None => base.identity()?,
            };
            let name = id.cert.name.clone();
            Ok((id, None, name))
        }
        // The anchor signs with its data dir's operator identity and
        // records who asked (ADR 0006).
        Caller::Operator(user, _) => Ok((
            base.identity().map_err(|_| {
                Refusal::new(
                    403,
                    "this anchor holds no operator identity, so it signs no edits: sign yours with your own key (shoal apply --anchor URL --identity FILE)",
                )
            })?,
            Some(format!("{user} through the anchor API")),
            user.clone(),
        )),
        other => Err(Refusal::new(403, format!("{other} may not write here"))),
    }
}

/// What keeping `value` of `field` in `doc` writes (a conflict settled).
fn resolve_ops(doc: &str, field: &str, value: &Value) -> Result<(DocId, Ops), Refusal> {
    match DocId::parse(doc) {
        Ok(DocId::Node { .. }) => Err(Refusal::new(
            403,
            "node documents are their node's to write",
        )),
        Ok(id) => Ok((
            id,
            [(field.to_string(), Some(value.to_string()))]
                .into_iter()
                .collect(),
        )),
        Err(e) => Err(Refusal::new(400, format!("doc: {e}"))),
    }
}

/// Fields of one document to write: a value's JSON text, or `None` to
/// delete.
type Ops = BTreeMap<String, Option<String>>;

/// [`Command::Prepare`]: per document the fields `edit` would write (only
/// those that differ from now, or hold concurrent values) and their values
/// now; for `key`, also the unsigned change that writes them as that key,
/// made on a copy of the committed document off the loop. The key's
/// holder checks the change says what it was shown and signs it; the
/// answer costs the size of the edit, not of the document (ADR 0015).
fn prepare(
    base: &mut Base,
    edit: &Command,
    key: Option<PublicKey>,
    who: &str,
) -> Result<Answer, Refusal> {
    let edits: Vec<(DocId, Ops)> = match edit {
        Command::Apply {
            files,
            identity: None,
            ..
        } => {
            let manifests = manifests(files)?;
            let core = &base.core;
            datadir::plan_apply(&manifests, &|id| core.doc(id)).1
        }
        Command::Delete {
            kind,
            name,
            identity: None,
            ..
        } => {
            let k = kind_of(kind)?;
            let core = &base.core;
            vec![datadir::plan_delete(k, name, &|id| core.doc(id))?]
        }
        Command::Resolve { doc, field, value } => vec![resolve_ops(doc, field, value)?],
        Command::Rollout { app, action, .. } if action != "status" => {
            let now = base.now();
            let (fleet, _) = base.core.desired();
            let empty = crdt_state::Document::new(DocId::Fleet);
            let doc = base.core.doc(&DocId::Fleet).unwrap_or(&empty);
            let (ops, _) = rollout_ops(doc, &fleet, app, action, who, now.unix_s)?;
            vec![(DocId::Fleet, ops)]
        }
        other => {
            return Err(Refusal::new(
                400,
                format!(
                    "{} is not an edit that can be prepared (apply, delete, resolve, or a rollout's pause, resume or abort)",
                    other.verb()
                ),
            ));
        }
    };
    let mut planned = Vec::new();
    for (id, ops) in edits {
        let doc = base.core.doc(&id);
        let ops: Ops = ops
            .into_iter()
            .filter(|(k, v)| doc.is_none_or(|d| d.would_change(k, v.as_deref())))
            .collect();
        if ops.is_empty() {
            continue;
        }
        let before: BTreeMap<String, Option<String>> = ops
            .keys()
            .map(|k| (k.clone(), doc.and_then(|d| d.raw(k))))
            .collect();
        planned.push((id, ops, before));
    }
    let root = base.core.trust().root();
    let now = base.now().unix_s;
    Ok(Answer::Blocking(Box::new(move |store| {
        use base64::Engine;
        let mut edits = Vec::new();
        for (id, ops, before) in planned {
            let mut edit = json!({ "doc": id.to_string(), "ops": ops, "before": before });
            if let Some(key) = key {
                let mut doc = store
                    .load(&id)?
                    .unwrap_or_else(|| crdt_state::Document::new(id.clone()));
                if let Some((hash, bytes)) = doc.unsigned_change(key, now, &ops)? {
                    edit["change"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
                    edit["hash"] = json!(hash.to_string());
                }
            }
            edits.push(edit);
        }
        Ok(Answer::Json(
            json!({ "root": root.to_string(), "edits": edits }),
        ))
    })))
}

fn no_rollout(app: &str) -> Refusal {
    Refusal::new(
        404,
        format!(
            "app {app} has no rollout (an App with spec.rollout starts one when its spec changes)"
        ),
    )
}

/// A rollout's status as the command answers it.
pub fn rollout_answer(
    status: &crdt_state::fleet::rollout::RolloutStatus,
    output: Option<Format>,
) -> Answer {
    match output {
        None => Answer::Json(serde_json::to_value(status).unwrap_or_default()),
        Some(f) => Answer::Text(render::rollout(f, status)),
    }
}

/// What an operator's `pause`, `resume` or `abort` of `app`'s rollout
/// writes, and the words for it. Refuses an unknown action, an app
/// without a rollout, and a rollout that is over.
pub fn rollout_ops(
    doc: &crdt_state::Document,
    fleet: &crdt_state::fleet::model::FleetView,
    app: &str,
    action: &str,
    by: &str,
    at: i64,
) -> Result<(BTreeMap<String, Option<String>>, String), Refusal> {
    use crdt_state::fleet::rollout::{Decision, Mark, decision_ops, revision};
    let decision = match action {
        "pause" => Decision::Pause,
        "resume" => Decision::Resume,
        "abort" => Decision::Abort,
        other => {
            return Err(Refusal::new(
                400,
                format!("rollout action {other:?}: expected status, pause, resume or abort"),
            ));
        }
    };
    let state = fleet.rollouts.get(app).ok_or_else(|| no_rollout(app))?;
    let current = fleet.apps.get(app).map(revision);
    if current.as_deref() != Some(state.revision.as_str()) {
        return Err(no_rollout(app));
    }
    let version = fleet
        .apps
        .get(app)
        .and_then(|a| a.version.clone())
        .unwrap_or_else(|| state.revision.clone());
    if state.done.is_some() || state.aborted.is_some() {
        return Err(Refusal::new(
            409,
            format!(
                "the rollout of {app} {version} is over ({}); to go back, apply the version before",
                if state.done.is_some() {
                    "done"
                } else {
                    "aborted"
                }
            ),
        ));
    }
    let unchanged = match decision {
        Decision::Pause => state.paused.is_some(),
        Decision::Resume => state.paused.is_none() && state.halted.is_none(),
        _ => false,
    };
    let text = match (&decision, unchanged) {
        (Decision::Pause, true) => format!("the rollout of {app} {version} was paused already"),
        (Decision::Resume, true) => format!("the rollout of {app} {version} was not paused"),
        (Decision::Pause, _) => format!("rollout of {app} {version} paused: no further wave opens"),
        (Decision::Resume, _) => format!("rollout of {app} {version} resumed"),
        _ => format!(
            "rollout of {app} {version} aborted: every node goes back to what it ran before"
        ),
    };
    if unchanged {
        return Ok((BTreeMap::new(), text));
    }
    let mark = Mark {
        at,
        by: by.to_string(),
        reason: format!("{action} by {by}"),
    };
    Ok((
        decision_ops(doc, app, &state.revision, &decision, &mark),
        text,
    ))
}

fn unix_now() -> i64 {
    crate::driver::unix_now()
}

/// Parses an identity file's content sent with a command.
pub fn parse_identity(text: &str) -> Result<Identity, Refusal> {
    Identity::from_json("--identity", text.as_bytes()).map_err(Refusal::from)
}

/// The manifests of `shoal apply`'s files (label, text).
pub fn manifests(
    files: &[(String, String)],
) -> Result<Vec<crdt_state::fleet::manifest::Manifest>, Refusal> {
    let mut out = Vec::new();
    for (label, text) in files {
        out.extend(
            crdt_state::fleet::manifest::parse(label, text).map_err(crdt_state::Error::from)?,
        );
    }
    Ok(out)
}

/// An output format named by the caller.
pub fn format(output: &str) -> Result<Format, Refusal> {
    output.parse().map_err(|e: String| Refusal::new(400, e))
}

/// The kind `shoal delete` names.
pub fn kind_of(kind: &str) -> Result<Kind, Refusal> {
    Kind::parse(kind).ok_or_else(|| {
        Refusal::new(
            400,
            format!(
                "unknown kind {kind:?}: expected app, config, node, site, profile, device or artifact"
            ),
        )
    })
}

/// What `shoal delete` prints.
pub fn deleted(kind: Kind, name: &str) -> String {
    format!("{}/{name} deleted\n", kind.as_str().to_lowercase())
}

/// What `shoal identity revoke` prints.
pub fn revoked(key: PublicKey, r: &crdt_state::signed::verify::Revocation) -> String {
    format!(
        "revoked {} ({} of its actors keep their changes so far)\n",
        key.short(),
        r.accepted.len()
    )
}

/// What `shoal bundle import` prints.
pub fn imported(report: &ImportReport) -> String {
    let mut out = String::new();
    if report.new_changes.is_empty() {
        out.push_str("nothing new\n");
    }
    for (doc, n) in &report.new_changes {
        out.push_str(&format!("{doc}: {n} new changes\n"));
    }
    if report.waiting > 0 {
        out.push_str(&format!(
            "{} changes wait for changes they depend on (import a fuller bundle)\n",
            report.waiting
        ));
    }
    out
}

#[derive(Clone, Copy)]
enum Table {
    Apps,
    Configs,
    Nodes,
    Conflicts,
    Sites,
    Profiles,
    Devices,
    Artifacts,
    Changes,
}

fn get_kind(what: &str) -> Result<Table, Refusal> {
    Ok(match what {
        "apps" | "app" => Table::Apps,
        "configs" | "config" => Table::Configs,
        "nodes" | "node" => Table::Nodes,
        "conflicts" | "conflict" => Table::Conflicts,
        "sites" | "site" => Table::Sites,
        "profiles" | "profile" => Table::Profiles,
        "devices" | "device" => Table::Devices,
        "artifacts" | "artifact" => Table::Artifacts,
        "changes" | "change" => Table::Changes,
        other => {
            return Err(Refusal::new(
                400,
                format!(
                    "cannot get {other:?}: expected apps, configs, nodes, sites, profiles, devices, artifacts, conflicts or changes"
                ),
            ));
        }
    })
}

/// `shoal get WHAT`: a table of committed documents (`contacts`: what a
/// running daemon knows of its peers).
pub fn get(
    reader: &Reader<'_>,
    what: &str,
    output: Format,
    contacts: Option<&BTreeMap<String, Contact>>,
    now: i64,
) -> anyhow::Result<String> {
    Ok(
        match get_kind(what).map_err(|r| anyhow::anyhow!(r.error))? {
            Table::Apps => render::apps(output, &reader.fleet()?),
            Table::Configs => render::configs(output, &reader.fleet()?),
            Table::Nodes => render::nodes_with_contacts(
                output,
                &reader.fleet()?,
                contacts,
                &reader.reports()?,
                now,
            ),
            Table::Conflicts => render::conflicts(output, &reader.conflicts()?),
            Table::Changes => render::changes(output, &reader.changes()?),
            Table::Sites => render::sites(output, &reader.sites()?),
            Table::Profiles => render::profiles(output, &reader.fleet()?),
            Table::Devices => render::devices(output, &reader.fleet()?),
            Table::Artifacts => render::artifacts(
                output,
                &reader.fleet()?,
                &render::holdings(&reader.reports()?),
            ),
        },
    )
}

/// Handles a command from a surface and sends its answer (after the
/// commit of what it wrote, or from a blocking thread for a store read).
pub fn dispatch<H: Host>(host: &mut H, incoming: Incoming) {
    let (caller, cmd, reply) = incoming;
    let span = tracing::debug_span!("command", verb = cmd.verb(), %caller);
    let _entered = span.enter();
    let r = handle(host, &caller, cmd);
    if let Err(e) = &r {
        tracing::info!(status = e.status, error = %e.error, "command refused");
    }
    host.base().answer(r, reply);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdt_state::Role;
    use crdt_state::signed::identity::generate_key;
    use crdt_state::signed::verify::Revocation;

    struct Fleet {
        trust: Trust,
        node: Certificate,
        anchor: Certificate,
        operator: PublicKey,
        engineer: PublicKey,
        other_site: PublicKey,
        revoked: PublicKey,
        stranger: PublicKey,
    }

    fn fleet() -> Fleet {
        let root = generate_key().unwrap();
        let mut trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
        let mut cert = |name: &str, role: Role, site: Option<&str>| {
            let id = Identity::issue(&root, generate_key().unwrap(), name, role, site, 0).unwrap();
            trust.add_cert(id.cert.clone()).unwrap();
            id.cert
        };
        let node = cert("n1", Role::Node, Some("s1"));
        let anchor = cert("a1", Role::Anchor, None);
        let operator = cert("op", Role::Operator, None).key;
        let engineer = cert("eng", Role::SiteEngineer, Some("s1")).key;
        let other_site = cert("eng2", Role::SiteEngineer, Some("s2")).key;
        let revoked = cert("gone", Role::SiteEngineer, Some("s1")).key;
        trust.revoke(
            revoked,
            Revocation {
                reason: "left".into(),
                accepted: Default::default(),
                certified: Vec::new(),
            },
        );
        let stranger = PublicKey(generate_key().unwrap().verifying_key().to_bytes());
        Fleet {
            trust,
            node,
            anchor,
            operator,
            engineer,
            other_site,
            revoked,
            stranger,
        }
    }

    fn every_command(f: &Fleet) -> Vec<Command> {
        vec![
            Command::Apply {
                files: vec![],
                identity: None,
                output: None,
            },
            Command::Apply {
                files: vec![],
                identity: Some("{}".into()),
                output: None,
            },
            Command::Delete {
                kind: "app".into(),
                name: "a".into(),
                identity: None,
                output: None,
            },
            Command::Resolve {
                doc: "fleet".into(),
                field: "f".into(),
                value: Value::Null,
            },
            Command::Get {
                what: "apps".into(),
                output: "json".into(),
            },
            Command::Revoke {
                who: "x".into(),
                reason: "y".into(),
            },
            Command::Rollout {
                app: "a".into(),
                action: "abort".into(),
                output: None,
            },
            Command::Prepare {
                edit: Box::new(Command::Resolve {
                    doc: "fleet".into(),
                    field: "f".into(),
                    value: Value::Null,
                }),
                key: Some(f.operator),
            },
            Command::Certify(Box::new(f.node.clone())),
            Command::TokenCreate(TokenRequest {
                node: "n".into(),
                site: None,
                labels: BTreeMap::new(),
                ttl_s: 60,
                grant: None,
            }),
            Command::Export { only: None },
            Command::Export {
                only: Some("site/s1".into()),
            },
            Command::Export {
                only: Some("site/s2".into()),
            },
            Command::Import {
                bundle: vec![],
                output: None,
            },
            Command::View,
            Command::Devices {
                path: "/api/devices".into(),
            },
            Command::Data {
                records: Vec::new(),
            },
            Command::Security {
                source: "s".into(),
                reason: "r".into(),
            },
            Command::Login {
                role: "viewer".into(),
            },
            Command::Audit {
                kind: "token".into(),
                subject: "t".into(),
                text: "made".into(),
            },
        ]
    }

    /// The label of a command in the table below.
    fn label(c: &Command) -> String {
        match c {
            Command::Apply {
                identity: Some(_), ..
            } => "apply --identity".into(),
            Command::Export { only: Some(d) } => format!("export {d}"),
            Command::Export { only: None } => "export all".into(),
            other => other.verb().into(),
        }
    }

    /// What each caller may do, on a node of site s1: the whole table, so a
    /// change to who may do what shows up here.
    #[test]
    fn who_may_do_what() {
        let f = fleet();
        let allowed = |caller: &Caller, me: &Certificate| -> Vec<String> {
            every_command(&f)
                .iter()
                .filter(|c| authorize(&f.trust, me, caller, c).is_ok())
                .map(label)
                .collect()
        };
        let all: Vec<String> = every_command(&f).iter().map(label).collect();
        assert_eq!(allowed(&Caller::Owner, &f.node), all);
        assert_eq!(
            allowed(&Caller::Operator("alice".into(), None), &f.anchor),
            [
                "apply",
                "delete",
                "resolve",
                "get",
                "rollout",
                // What an edit writes, for a browser to sign, and a
                // certificate the root made, to publish (ADR 0015).
                "prepare",
                "certify",
                "export all",
                "export site/s1",
                "export site/s2",
                // Signed elsewhere: the signatures, not the token, decide.
                "import",
                "security",
                "login",
                // The timeline entries of the API's own routes (invitations).
                "audit"
            ]
        );
        let site_api = ["export site/s1", "import", "view", "devices"];
        assert_eq!(allowed(&Caller::Signed(f.engineer), &f.node), site_api);
        // An operator may edit any site, so it may use any node's site API.
        assert_eq!(allowed(&Caller::Signed(f.operator), &f.node), site_api);
        for key in [f.other_site, f.revoked, f.stranger] {
            assert!(allowed(&Caller::Signed(key), &f.node).is_empty());
        }
        assert_eq!(allowed(&Caller::App(None), &f.node), ["devices"]);
        assert_eq!(
            allowed(&Caller::App(Some("inspect".into())), &f.node),
            ["devices", "post data"]
        );
        assert_eq!(
            allowed(&Caller::Surface("HTTP API".into()), &f.node),
            ["security", "audit"]
        );
        // A daemon of no site answers no signed request.
        assert!(allowed(&Caller::Signed(f.engineer), &f.anchor).is_empty());
    }

    #[test]
    fn refusals_say_why() {
        let f = fleet();
        let view = Command::View;
        let why = |caller: Caller| authorize(&f.trust, &f.node, &caller, &view).unwrap_err();
        let r = why(Caller::Signed(f.stranger));
        assert_eq!(
            (r.status, r.error.as_str()),
            (401, "no certificate of this fleet for that key")
        );
        let r = why(Caller::Signed(f.revoked));
        assert_eq!((r.status, r.error.as_str()), (403, "gone is revoked"));
        let r = why(Caller::Signed(f.other_site));
        assert_eq!(r.status, 403);
        assert!(r.error.contains("may not edit site s1"), "{}", r.error);
        let r = why(Caller::App(None));
        assert_eq!(
            (r.status, r.error.as_str()),
            (403, "an app may not view here")
        );
        let r = authorize(&f.trust, &f.anchor, &Caller::Signed(f.engineer), &view).unwrap_err();
        assert_eq!(
            (r.status, r.error.as_str()),
            (404, "this node belongs to no site")
        );
    }

    #[test]
    fn commands_cross_the_socket_unchanged() {
        for c in every_command(&fleet()) {
            let text = serde_json::to_string(&c).unwrap();
            let back: Command = serde_json::from_str(&text).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), text);
        }
        let c = Command::Import {
            bundle: vec![0, 1, 254, 255],
            output: None,
        };
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains("\"0001feff\""), "{text}");
        let bad = text.replace("0001feff", "0001fg");
        let e = serde_json::from_str::<Command>(&bad).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}
