//! The CLI verbs that work on a data dir, and the local control socket
//! through which they reach a daemon that holds that data dir.
//!
//! The same [`execute`] runs either in the CLI process (nothing holds the
//! data dir) or inside the daemon (the CLI sent the request over
//! `<data-dir>/control.sock`, owner-only), so the output is the same
//! either way. Files named on the command line are read by the CLI and
//! sent as content; a bundle to export comes back as bytes.

use std::collections::BTreeMap;
use std::path::Path;
use tokio::io::AsyncReadExt as _;
use tracing::Instrument;

use crate::render::{self, Contact, Format};
use anyhow::{Context, anyhow, bail};
use crdt_state::fleet::model::Kind;
use crdt_state::{DataDir, Identity, fleet::manifest};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::enroll::{self, TokenRequest};

/// The socket's file name in the data dir.
pub const SOCKET_FILE: &str = "control.sock";
/// Largest request line (a bundle to import travels as hex).
pub const MAX_REQUEST: usize = 256 << 20;

/// A verb.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// `shoal apply`: (label, text) of each file.
    Apply {
        /// The files.
        files: Vec<(String, String)>,
        /// An identity file's content to sign with.
        identity: Option<String>,
        /// Output format.
        output: String,
    },
    /// `shoal delete`.
    Delete {
        /// Kind.
        kind: String,
        /// Name.
        name: String,
        /// An identity file's content to sign with.
        identity: Option<String>,
    },
    /// `shoal get`.
    Get {
        /// apps, configs, nodes or conflicts.
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
    /// `shoal bundle export`.
    BundleExport,
    /// `shoal bundle import` (hex bytes).
    BundleImport(String),
}

/// The answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Printed on standard output.
    pub stdout: String,
    /// Bytes for the CLI to write (an exported bundle), hex.
    pub data: Option<String>,
    /// The error, if the verb failed.
    pub error: Option<String>,
}

/// What only a running daemon knows.
#[derive(Clone, Debug, Default)]
pub struct Live {
    /// Contacts per node name.
    pub contacts: Option<BTreeMap<String, Contact>>,
    /// Our listen addresses (for tokens).
    pub addrs: Vec<String>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub(crate) fn parse_identity(text: &str) -> anyhow::Result<Identity> {
    Ok(Identity::from_json("--identity", text.as_bytes())?)
}

/// The manifests of `shoal apply`'s files (label, text).
pub(crate) fn manifests(files: &[(String, String)]) -> anyhow::Result<Vec<manifest::Manifest>> {
    let mut out = Vec::new();
    for (label, text) in files {
        out.extend(manifest::parse(label, text)?);
    }
    Ok(out)
}

/// An output format named on the command line.
pub(crate) fn format(output: &str) -> anyhow::Result<Format> {
    output.parse().map_err(|e: String| anyhow!(e))
}

/// The kind `shoal delete` names.
pub(crate) fn kind_of(kind: &str) -> anyhow::Result<Kind> {
    Kind::parse(kind)
        .ok_or_else(|| anyhow!("unknown kind {kind:?}: expected app, config, node or site"))
}

/// What `shoal delete` prints.
pub(crate) fn deleted(kind: Kind, name: &str) -> String {
    format!("{}/{name} deleted\n", kind.as_str().to_lowercase())
}

/// Runs a verb against an open data dir.
pub fn execute(dd: &mut DataDir, req: Request, live: &Live) -> Reply {
    match execute_inner(dd, req, live) {
        Ok(r) => r,
        Err(e) => Reply {
            error: Some(format!("{e:#}").replace('\n', " ")),
            ..Reply::default()
        },
    }
}

fn with_identity<T>(
    dd: &mut DataDir,
    identity: Option<String>,
    f: impl FnOnce(&mut DataDir) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let Some(text) = identity else {
        return f(dd);
    };
    let id = parse_identity(&text)?;
    let old = dd.swap_identity(Some(id))?;
    let r = f(dd);
    dd.swap_identity(old)?;
    r
}

fn execute_inner(dd: &mut DataDir, req: Request, live: &Live) -> anyhow::Result<Reply> {
    let stdout = match req {
        Request::Apply {
            files,
            identity,
            output,
        } => {
            let output = format(&output)?;
            let manifests = manifests(&files)?;
            let applied = with_identity(dd, identity, |dd| Ok(dd.apply(&manifests, now())?))?;
            render::applied(output, &applied)
        }
        Request::Delete {
            kind,
            name,
            identity,
        } => {
            let k = kind_of(&kind)?;
            with_identity(dd, identity, |dd| Ok(dd.delete(k, &name, now())?))?;
            deleted(k, &name)
        }
        Request::Get { what, output } => {
            let output = format(&output)?;
            match what.as_str() {
                "apps" | "app" => render::apps(output, &dd.fleet()?),
                "configs" | "config" => render::configs(output, &dd.fleet()?),
                "nodes" | "node" => render::nodes_with_contacts(
                    output,
                    &dd.fleet()?,
                    live.contacts.as_ref(),
                    &dd.reports()?,
                    now(),
                ),
                "conflicts" | "conflict" => render::conflicts(output, &dd.conflicts()?),
                "sites" | "site" => render::sites(output, &dd.sites()?),
                "profiles" | "profile" => render::profiles(output, &dd.fleet()?),
                "devices" | "device" => render::devices(output, &dd.fleet()?),
                other => {
                    bail!(
                        "cannot get {other:?}: expected apps, configs, nodes, sites, profiles, devices or conflicts"
                    )
                }
            }
        }
        Request::Revoke { who, reason } => {
            let key = dd.find_key(&who)?;
            let r = dd.revoke(key, &reason, now())?;
            format!(
                "revoked {} ({} of its actors keep their changes so far)\n",
                key.short(),
                r.accepted.len()
            )
        }
        Request::TokenCreate(t) => {
            let addrs = if live.addrs.is_empty() {
                enroll::read_addrs(dd.path())
            } else {
                live.addrs.clone()
            };
            let token = enroll::create_token(dd, addrs, &t, now())?;
            format!("{token}\n")
        }
        Request::BundleExport => {
            let bytes = dd.export()?;
            return Ok(Reply {
                data: Some(hex::encode(bytes)),
                ..Reply::default()
            });
        }
        Request::BundleImport(h) => {
            let bytes = hex::decode(h).map_err(|_| anyhow!("bundle bytes damaged in transit"))?;
            let report = dd.import(&bytes)?;
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
    };
    Ok(Reply {
        stdout,
        ..Reply::default()
    })
}

/// Runs a verb on a data dir: through its daemon's control socket when one
/// answers, else directly.
pub fn run(dir: &Path, identity_file: Option<&Path>, req: Request) -> anyhow::Result<Reply> {
    let sock = dir.join(SOCKET_FILE);
    if sock.exists()
        && let Ok(stream) = std::os::unix::net::UnixStream::connect(&sock)
    {
        return call(stream, &req);
    }
    let mut dd = DataDir::open(dir, identity_file)?;
    Ok(execute(&mut dd, req, &Live::default()))
}

fn call(mut stream: std::os::unix::net::UnixStream, req: &Request) -> anyhow::Result<Reply> {
    use std::io::{BufRead, Write};
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .context("sending to the daemon's control socket")?;
    let mut reader = std::io::BufReader::new(stream);
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .context("reading the daemon's answer")?;
    if answer.is_empty() {
        bail!("the daemon closed the control socket without an answer");
    }
    Ok(serde_json::from_str(&answer)?)
}

/// A request from the socket with the channel for its answer.
pub type Incoming = (Request, tokio::sync::oneshot::Sender<Reply>);

/// Serves the control socket: each connection sends one request line and
/// gets one answer line. Requests go to the daemon's loop through `tx`.
pub async fn serve(dir: &Path, tx: tokio::sync::mpsc::Sender<Incoming>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(SOCKET_FILE);
    // We hold the store's lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(&path);
    // Created owner-only (umask), not chmod-ed after the fact: no window in
    // which another user could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let bound = tokio::net::UnixListener::bind(&path);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("control socket {}", path.display()))?;
    let listener = std::sync::Arc::new(listener);
    tokio::spawn(
        accept_loop(
            move || {
                let l = listener.clone();
                async move { l.accept().await.map(|(s, _)| s) }
            },
            move |stream| {
                let tx = tx.clone();
                tokio::spawn(
                    async move {
                        let (r, mut w) = stream.into_split();
                        let mut reader = BufReader::new(r).take(MAX_REQUEST as u64);
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.is_err() {
                            return;
                        }
                        let reply = match serde_json::from_str::<Request>(&line) {
                            Ok(req) => {
                                let (otx, orx) = tokio::sync::oneshot::channel();
                                if tx.send((req, otx)).await.is_err() {
                                    return;
                                }
                                orx.await.unwrap_or_else(|_| Reply {
                                    error: Some("the daemon stopped".into()),
                                    ..Reply::default()
                                })
                            }
                            Err(e) => Reply {
                                error: Some(format!("malformed control request: {e}")),
                                ..Reply::default()
                            },
                        };
                        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                        out.push(b'\n');
                        let _ = w.write_all(&out).await;
                    }
                    .in_current_span(),
                );
            },
        )
        .instrument(tracing::info_span!("control_socket")),
    );
    Ok(())
}

/// Accepts connections for ever, handing each to `handle`. A failed accept
/// (out of file descriptors, say) is logged and waited out, 10 ms doubling
/// to 1 s, instead of being retried in a hot loop.
async fn accept_loop<S, F, Fut>(mut accept: F, mut handle: impl FnMut(S))
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        match accept().await {
            Ok(s) => {
                backoff = std::time::Duration::from_millis(10);
                handle(s);
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed; waiting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_failing_accept_is_waited_out_not_spun() {
        let tries = Arc::new(AtomicUsize::new(0));
        let t = tries.clone();
        let task = tokio::spawn(accept_loop(
            move || {
                t.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), _>(std::io::Error::other("EMFILE")) }
            },
            |_| {},
        ));
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        task.abort();
        // With 10, 20, 40, ... ms waits, 500 ms hold 6 attempts; a hot loop
        // makes hundreds of thousands.
        let n = tries.load(Ordering::Relaxed);
        assert!((2..=10).contains(&n), "{n} accept attempts in 500 ms");
    }
}
