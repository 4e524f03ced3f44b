//! The CLI's way to a data dir: the local control socket through which a
//! [`Command`] reaches the daemon that holds the data dir, and, when no
//! daemon holds it, [`execute`] on the data dir in the CLI process.
//!
//! Through the socket (`<data-dir>/control.sock`, owner-only) a command is
//! one of the daemon's commands from [`Caller::Owner`], handled by
//! [`crate::command::handle`] like those of the operator and site APIs.
//! Without a daemon the same verbs run on the data dir's own write path,
//! and print the same output. Files named on the command line are read by
//! the CLI and sent as content; a bundle to export comes back as bytes.

use std::path::Path;
use tokio::io::AsyncReadExt as _;
use tracing::Instrument;

use anyhow::{Context, bail};
use crdt_state::{DataDir, DocId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::command::{self, Answer, Caller, Command, Incoming, Refusal};
use crate::enroll;
use crate::render;

/// The socket's file name in the data dir.
pub const SOCKET_FILE: &str = "control.sock";
/// Largest request line (a bundle to import travels as hex).
pub const MAX_REQUEST: usize = 256 << 20;

/// The answer, as it travels back over the socket.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Printed on standard output.
    pub stdout: String,
    /// Bytes for the CLI to write (an exported bundle), hex.
    pub data: Option<String>,
    /// The error, if the verb failed.
    pub error: Option<String>,
}

impl From<Result<Answer, Refusal>> for Reply {
    fn from(r: Result<Answer, Refusal>) -> Reply {
        match r {
            Ok(Answer::Text(stdout)) => Reply {
                stdout,
                ..Reply::default()
            },
            Ok(Answer::Json(v)) => Reply {
                stdout: format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()),
                ..Reply::default()
            },
            Ok(Answer::Bytes(b)) => Reply {
                data: Some(hex::encode(b)),
                ..Reply::default()
            },
            Ok(Answer::Blocking(_)) => Reply {
                error: Some("internal: a store read was not run".into()),
                ..Reply::default()
            },
            Err(e) => Reply {
                error: Some(e.error.replace('\n', " ")),
                ..Reply::default()
            },
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Runs a command on a data dir no daemon holds (the CLI process): the
/// same verbs, on the data dir's own write path (one signed change per
/// document, committed), with the same output.
pub fn execute(dd: &mut DataDir, cmd: Command) -> Reply {
    execute_inner(dd, cmd).into()
}

fn with_identity<T>(
    dd: &mut DataDir,
    identity: Option<String>,
    f: impl FnOnce(&mut DataDir) -> crdt_state::Result<T>,
) -> Result<T, Refusal> {
    let Some(text) = identity else {
        return Ok(f(dd)?);
    };
    let id = command::parse_identity(&text)?;
    let old = dd.swap_identity(Some(id))?;
    let r = f(dd);
    dd.swap_identity(old)?;
    Ok(r?)
}

fn execute_inner(dd: &mut DataDir, cmd: Command) -> Result<Answer, Refusal> {
    let text = match cmd {
        Command::Apply {
            files,
            identity,
            output,
        } => {
            let output = output.as_deref().map(command::format).transpose()?;
            let manifests = command::manifests(&files)?;
            let applied = with_identity(dd, identity, |dd| dd.apply(&manifests, now()))?;
            match output {
                Some(f) => render::applied(f, &applied),
                None => return Ok(Answer::Json(serde_json::json!({ "applied": applied }))),
            }
        }
        Command::Delete {
            kind,
            name,
            identity,
            ..
        } => {
            let k = command::kind_of(&kind)?;
            with_identity(dd, identity, |dd| dd.delete(k, &name, now()))?;
            command::deleted(k, &name)
        }
        Command::Resolve { doc, field, value } => {
            let id = DocId::parse(&doc).map_err(|e| Refusal::new(400, format!("doc: {e}")))?;
            let ops = [(field.clone(), Some(value.to_string()))]
                .into_iter()
                .collect();
            dd.write(&id, &ops, now())?;
            format!("{field} in {doc}: {value} kept\n")
        }
        Command::Get { what, output } => {
            let output = command::format(&output)?;
            command::get(&dd.reader(), &what, output, None, now())?
        }
        Command::Revoke { who, reason } => {
            let key = dd.find_key(&who)?;
            let r = dd.revoke(key, &reason, now())?;
            command::revoked(key, &r)
        }
        Command::TokenCreate(t) => {
            let addrs = enroll::read_addrs(dd.path());
            let grantor = dd.identity().cloned();
            let token = enroll::create_token(
                dd.path(),
                &dd.trust().root(),
                addrs,
                &t,
                grantor.as_ref(),
                now(),
            )?;
            format!("{token}\n")
        }
        Command::Export { only } => {
            let only = command::only_docs(only.as_deref())?;
            let bytes = dd.export_some(|id| only.as_ref().is_none_or(|o| o.contains(id)))?;
            return Ok(Answer::Bytes(bytes));
        }
        Command::Import { bundle, .. } => command::imported(&dd.import(&bundle)?),
        Command::Rollout {
            app,
            action,
            output,
        } => {
            let output = output.as_deref().map(command::format).transpose()?;
            let fleet = dd.fleet()?;
            if action == "status" {
                // No anchor's gate here: health over time is not known.
                let reports = dd.reports()?;
                let mut seen = Default::default();
                let (status, _) =
                    crdt_state::fleet::rollout::judge(&fleet, &app, &reports, &mut seen, 0)
                        .ok_or_else(|| {
                            Refusal::new(404, format!("app {app} has no rollout in progress"))
                        })?;
                return Ok(command::rollout_answer(&status, output));
            }
            let by = dd.writer()?.cert.name.clone();
            let doc = dd.doc(&DocId::Fleet)?;
            let (ops, text) = command::rollout_ops(&doc, &fleet, &app, &action, &by, now())?;
            if !ops.is_empty() {
                dd.write(&DocId::Fleet, &ops, now())?;
            }
            format!("{text}\n")
        }
        other => {
            return Err(Refusal::new(
                400,
                format!("{} needs a running daemon", other.verb()),
            ));
        }
    };
    Ok(Answer::Text(text))
}

/// Runs a verb on a data dir: through its daemon's control socket when one
/// answers, else directly.
pub fn run(dir: &Path, identity_file: Option<&Path>, cmd: Command) -> anyhow::Result<Reply> {
    let sock = dir.join(SOCKET_FILE);
    if sock.exists()
        && let Ok(stream) = std::os::unix::net::UnixStream::connect(&sock)
    {
        return call(stream, &cmd);
    }
    let mut dd = DataDir::open(dir, identity_file)?;
    Ok(execute(&mut dd, cmd))
}

fn call(mut stream: std::os::unix::net::UnixStream, req: &Command) -> anyhow::Result<Reply> {
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

/// Serves the control socket: each connection sends one command line and
/// gets one answer line. Commands go to the daemon's loop through `tx`,
/// from [`Caller::Owner`] (the socket is the data dir owner's only).
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
                        let reply = match serde_json::from_str::<Command>(&line) {
                            Ok(cmd) => {
                                let (otx, orx) = tokio::sync::oneshot::channel();
                                if tx.send((Caller::Owner, cmd, otx)).await.is_err() {
                                    return;
                                }
                                orx.await
                                    .unwrap_or_else(|_| {
                                        Err(Refusal::new(503, "the daemon stopped"))
                                    })
                                    .into()
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
