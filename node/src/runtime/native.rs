//! The native runtime: a process supervisor.
//!
//! One supervisor task per app. It renders the app's config files into
//! `<data-dir>/apps/<app>/`, starts the command there in a process group
//! of its own with the app's environment, pipes stdout and stderr into
//! size-bounded log files (`stdout.log`, `stderr.log`, one rotated `.1`
//! each), restarts it by its restart policy with exponential backoff
//! (1 s doubling to 30 s, back to 1 s after 30 s of running), runs its
//! health check and restarts it when the check fails. An app marked
//! `outlive_node` is left running when the daemon stops (its output goes
//! straight to its log files, not through pipes to the daemon) and adopted
//! by the next start if its spec is unchanged. A changed spec
//! replaces the process; an app no longer desired is stopped (SIGTERM to
//! its process group, SIGKILL after a grace period). The running process
//! is recorded in `<app>/pid`; a node that starts after a crash kills what
//! its previous run left behind before starting anything.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

use crdt_state::fleet::model::{
    HealthCheck, NativeSpec, RestartPolicy, RuntimeKind, WorkloadReport, WorkloadState,
};
use crdt_state::fleet::placement::Workload;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest log file before it is rotated (one `.1` kept).
pub const LOG_LIMIT: u64 = 1 << 20;
/// Time a process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

type Shared = Arc<Mutex<WorkloadReport>>;

struct App {
    key: String,
    outlive: bool,
    status: Shared,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The native runtime.
pub struct Native {
    root: PathBuf,
    apps: BTreeMap<String, App>,
    /// Reports of workloads this runtime cannot run (kube apps).
    refused: BTreeMap<String, WorkloadReport>,
    stopping: Vec<JoinHandle<()>>,
    /// Processes of `outlive_node` apps left running by the previous run:
    /// app → (pid, workload key).
    adoptable: BTreeMap<String, (i32, String)>,
}

/// What `<app>/pid` records.
#[derive(Serialize, Deserialize)]
struct PidFile {
    pid: i32,
    cmdline: Vec<String>,
    /// The workload it runs (for adoption after a node restart).
    #[serde(default)]
    key: String,
    #[serde(default)]
    outlive: bool,
    /// Its start time (jiffies since boot, /proc/<pid>/stat field 22):
    /// with the pid, it names the process even after an exec.
    #[serde(default)]
    start: u64,
}

/// A process's start time from `/proc/<pid>/stat`.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

impl Native {
    /// A runtime keeping app directories under `root`; kills processes a
    /// previous run left behind.
    pub fn new(root: PathBuf) -> Native {
        let adoptable = reap_leftovers(&root);
        Native {
            root,
            apps: BTreeMap::new(),
            refused: BTreeMap::new(),
            stopping: Vec::new(),
            adoptable,
        }
    }

    fn stop(&mut self, name: &str) {
        if let Some(app) = self.apps.remove(name) {
            let _ = app.stop.send(true);
            self.stopping.push(app.task);
        }
    }
}

impl super::Runtime for Native {
    fn reconcile(&mut self, desired: &[Workload]) {
        self.stopping.retain(|t| !t.is_finished());
        self.refused.clear();
        let mut wanted = BTreeMap::new();
        for w in desired {
            if w.spec.runtime != RuntimeKind::Native || w.spec.native.is_none() {
                self.refused.insert(
                    w.app.clone(),
                    WorkloadReport {
                        state: WorkloadState::Failed,
                        reason: Some(
                            "the app runs on kube; this node runs the native runtime".into(),
                        ),
                        restarts: 0,
                        version: w.spec.version.clone(),
                        revision: None,
                    },
                );
                continue;
            }
            wanted.insert(w.app.clone(), w);
        }
        let gone: Vec<String> = self
            .apps
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            tracing::info!(app = %name, "stopping: no longer desired here");
            self.stop(&name);
        }
        // Left running by the previous run but no longer wanted as it is.
        let stale: Vec<String> = self
            .adoptable
            .iter()
            .filter(|(n, (_, key))| {
                wanted
                    .get(*n)
                    .is_none_or(|w| serde_json::to_string(w).unwrap_or_default() != *key)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if let Some((pid, _)) = self.adoptable.remove(&name) {
                tracing::info!(app = %name, pid, "stopping a process left running: its spec changed");
                let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        for (name, w) in wanted {
            let key = serde_json::to_string(w).unwrap_or_default();
            if self.apps.get(&name).is_some_and(|a| a.key == key) {
                continue;
            }
            if self.apps.contains_key(&name) {
                tracing::info!(app = %name, "restarting with a new spec");
                self.stop(&name);
            }
            let status: Shared = Arc::new(Mutex::new(WorkloadReport {
                state: WorkloadState::Pending,
                reason: None,
                restarts: 0,
                version: w.spec.version.clone(),
                revision: None,
            }));
            let (stop, stop_rx) = watch::channel(false);
            // A process being replaced may still hold its directory: start
            // the new one after it has gone.
            let previous: Vec<JoinHandle<()>> = std::mem::take(&mut self.stopping);
            let dir = self.root.join(&name);
            let adopt = self.adoptable.remove(&name).map(|(pid, _)| pid);
            let span = tracing::info_span!("app", app = %name);
            let task = tokio::spawn(
                supervise(
                    name.clone(),
                    w.clone(),
                    dir,
                    status.clone(),
                    stop_rx,
                    previous,
                    adopt,
                )
                .instrument(span),
            );
            let outlive = w.spec.native.as_ref().is_some_and(|n| n.outlive_node);
            self.apps.insert(
                name,
                App {
                    key,
                    outlive,
                    status,
                    stop,
                    task,
                },
            );
        }
    }

    fn status(&self) -> BTreeMap<String, WorkloadReport> {
        let mut out = self.refused.clone();
        for (name, app) in &self.apps {
            let r = app.status.lock().map(|r| r.clone()).unwrap_or_default();
            out.insert(name.clone(), r);
        }
        out
    }

    fn shutdown(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let names: Vec<String> = self.apps.keys().cloned().collect();
            for n in names {
                let outlive = self.apps.get(&n).is_some_and(|a| a.outlive);
                if outlive {
                    // Left running; its supervisor goes with the daemon.
                    if let Some(app) = self.apps.remove(&n) {
                        app.task.abort();
                    }
                    continue;
                }
                self.stop(&n);
            }
            for t in std::mem::take(&mut self.stopping) {
                let _ = t.await;
            }
        })
    }
}

fn set(status: &Shared, state: WorkloadState, reason: Option<String>) {
    if let Ok(mut s) = status.lock() {
        s.state = state;
        s.reason = reason;
    }
}

fn bump_restarts(status: &Shared) {
    if let Ok(mut s) = status.lock() {
        s.restarts += 1;
    }
}

/// Checks that a config file path stays inside the app directory.
pub fn safe_path(dir: &Path, rel: &str) -> Result<PathBuf, String> {
    let p = Path::new(rel);
    if rel.is_empty()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "config file path {rel:?} escapes the app directory"
        ));
    }
    Ok(dir.join(p))
}

/// The environment variable that names an app's artifact `local`
/// (`model` → `SHOAL_ARTIFACT_MODEL`).
pub fn artifact_var(local: &str) -> String {
    format!("SHOAL_ARTIFACT_{}", local.to_uppercase().replace('-', "_"))
}

/// `artifacts/<local>` in the app's directory: a link to each artifact's
/// read-only blob (the path its environment variable names too); links of
/// artifacts the app no longer names are removed.
fn link_artifacts(dir: &Path, w: &Workload) -> Result<(), String> {
    let links = dir.join("artifacts");
    let wanted = &w.artifacts;
    if wanted.is_empty() {
        if links.exists() {
            std::fs::remove_dir_all(&links)
                .map_err(|e| format!("cannot remove {}: {e}", links.display()))?;
        }
        return Ok(());
    }
    std::fs::create_dir_all(&links)
        .map_err(|e| format!("cannot create {}: {e}", links.display()))?;
    if let Ok(entries) = std::fs::read_dir(&links) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !wanted.keys().any(|l| **l == name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for (local, target) in wanted {
        let link = safe_path(&links, local)?;
        // Replaced atomically: a link made aside, then renamed over.
        let tmp = links.join(format!(".{local}.new"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)
            .map_err(|e| format!("cannot link {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &link).map_err(|e| format!("cannot link {}: {e}", link.display()))?;
    }
    Ok(())
}

fn prepare(dir: &Path, w: &Workload) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    link_artifacts(dir, w)?;
    for (rel, content) in &w.files {
        let path = safe_path(dir, rel)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, content)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Waits for `d` or a stop; true if stopped.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

async fn supervise(
    name: String,
    w: Workload,
    dir: PathBuf,
    status: Shared,
    mut stop: watch::Receiver<bool>,
    previous: Vec<JoinHandle<()>>,
    adopt: Option<i32>,
) {
    for p in previous {
        let _ = p.await;
    }
    let Some(spec) = w.spec.native.clone() else {
        return;
    };
    let key = serde_json::to_string(&w).unwrap_or_default();
    if let Some(pid) = adopt {
        tracing::info!(app = %name, pid, "adopting the process the previous run left running");
        set(&status, WorkloadState::Running, None);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if !process_alive(pid) {
                        set(&status, WorkloadState::Failed, Some("exited".into()));
                        break;
                    }
                }
                _ = stop.changed() => {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                    let deadline = Instant::now() + STOP_GRACE;
                    while process_alive(pid) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    let _ = std::fs::remove_file(dir.join("pid"));
                    set(&status, WorkloadState::Stopped, None);
                    return;
                }
            }
        }
    }
    if let Err(reason) = prepare(&dir, &w) {
        tracing::warn!(app = %name, %reason, "cannot prepare the app");
        set(&status, WorkloadState::Failed, Some(reason));
        let _ = stop.changed().await;
        set(&status, WorkloadState::Stopped, None);
        return;
    }
    let mut backoff = BACKOFF_FIRST;
    loop {
        if *stop.borrow() {
            break;
        }
        let started = Instant::now();
        let outcome = run_once(&name, &spec, &key, &dir, &status, &mut stop).await;
        if started.elapsed() >= BACKOFF_MAX {
            backoff = BACKOFF_FIRST;
        }
        let again = match &outcome {
            Outcome::Stopped => break,
            Outcome::SpawnFailed(reason) => {
                set(&status, WorkloadState::Failed, Some(reason.clone()));
                spec.restart != RestartPolicy::Never
            }
            Outcome::Exited(code) => {
                let ok = *code == Some(0);
                let reason = match code {
                    Some(c) => format!("exited with code {c}"),
                    None => "killed by a signal".to_string(),
                };
                match spec.restart {
                    RestartPolicy::Always => {
                        set(&status, WorkloadState::Failed, Some(reason));
                        true
                    }
                    RestartPolicy::OnFailure if !ok => {
                        set(&status, WorkloadState::Failed, Some(reason));
                        true
                    }
                    _ if ok => {
                        set(&status, WorkloadState::Stopped, Some(reason));
                        false
                    }
                    _ => {
                        set(&status, WorkloadState::Failed, Some(reason));
                        false
                    }
                }
            }
            Outcome::Unhealthy(reason) => {
                set(&status, WorkloadState::Failed, Some(reason.clone()));
                true
            }
        };
        if !again {
            let _ = stop.changed().await;
            break;
        }
        tracing::info!(app = %name, ?outcome, wait = ?backoff, "restarting after backoff");
        if sleep_or_stop(backoff, &mut stop).await {
            break;
        }
        bump_restarts(&status);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    let _ = std::fs::remove_file(dir.join("pid"));
    set(&status, WorkloadState::Stopped, None);
}

#[derive(Debug)]
enum Outcome {
    Stopped,
    SpawnFailed(String),
    Exited(Option<i32>),
    Unhealthy(String),
}

async fn run_once(
    name: &str,
    spec: &NativeSpec,
    key: &str,
    dir: &Path,
    status: &Shared,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    let Some((program, args)) = spec.command.split_first() else {
        return Outcome::SpawnFailed("empty command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(&spec.env)
        .current_dir(dir)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(!spec.outlive_node);
    if spec.outlive_node {
        // No pipes to us: the process must not die with the daemon. Its
        // logs go straight to the files (rotated at each start instead).
        for f in ["stdout.log", "stderr.log"] {
            let p = dir.join(f);
            if std::fs::metadata(&p).is_ok_and(|m| m.len() > LOG_LIMIT) {
                let _ = std::fs::rename(&p, p.with_extension("log.1"));
            }
        }
        let open = |f: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(f))
                .map(Stdio::from)
        };
        match (open("stdout.log"), open("stderr.log")) {
            (Ok(o), Ok(e)) => {
                cmd.stdout(o).stderr(e);
            }
            _ => return Outcome::SpawnFailed("cannot open the app's log files".into()),
        }
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                format!("cannot start {program}: no such program")
            } else {
                format!("cannot start {program}: {e}")
            };
            return Outcome::SpawnFailed(why);
        }
    };
    let pid = child.id().map(|p| p as i32);
    if let Some(pid) = pid {
        let record = PidFile {
            pid,
            cmdline: spec.command.clone(),
            key: key.to_string(),
            outlive: spec.outlive_node,
            start: start_time(pid).unwrap_or(0),
        };
        let _ = std::fs::write(
            dir.join("pid"),
            serde_json::to_vec(&record).unwrap_or_default(),
        );
    }
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, dir.join("stdout.log")).in_current_span());
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, dir.join("stderr.log")).in_current_span());
    }
    tracing::info!(app = %name, ?pid, "started");
    let health = spec.health.clone();
    if health.is_none() {
        set(status, WorkloadState::Running, None);
    }
    let status2 = status.clone();
    let checks = async move {
        match health {
            Some(h) => watch_health(&h, &status2).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        exit = child.wait() => {
            Outcome::Exited(exit.ok().and_then(|s| s.code()))
        }
        _ = stop.changed() => {
            terminate(pid, &mut child).await;
            Outcome::Stopped
        }
        reason = checks => {
            terminate(pid, &mut child).await;
            Outcome::Unhealthy(reason)
        }
    }
}

/// SIGTERM to the process group, SIGKILL after the grace period.
async fn terminate(pid: Option<i32>, child: &mut tokio::process::Child) {
    if let Some(pid) = pid {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            // The leader is gone; make sure nothing of its group stays.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            return;
        }
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill().await;
}

/// Runs health checks until the app is unhealthy; returns why.
async fn watch_health(h: &HealthCheck, status: &Shared) -> String {
    let mut failures = 0;
    let mut last = String::new();
    loop {
        tokio::time::sleep(Duration::from_secs(h.period_s)).await;
        let timeout = Duration::from_secs(h.timeout_s);
        match tokio::time::timeout(timeout, check(h)).await {
            Ok(Ok(())) => {
                failures = 0;
                set(status, WorkloadState::Running, None);
            }
            Ok(Err(e)) => {
                failures += 1;
                last = e;
            }
            Err(_) => {
                failures += 1;
                last = format!("no answer within {}s", h.timeout_s);
            }
        }
        if failures >= h.failures {
            return format!(
                "{} {failures} times: {last}",
                crdt_state::fleet::rollout::UNHEALTHY
            );
        }
    }
}

async fn check(h: &HealthCheck) -> Result<(), String> {
    if let Some(url) = &h.http {
        return http_check(url).await;
    }
    if let Some(addr) = &h.tcp {
        return tokio::net::TcpStream::connect(addr)
            .await
            .map(|_| ())
            .map_err(|e| format!("tcp {addr}: {e}"));
    }
    let Some((program, args)) = h.exec.split_first() else {
        return Err("no check".into());
    };
    let st = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| format!("exec {program}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("exec {program}: {st}"))
    }
}

/// A GET over HTTP/1.0; healthy on a 2xx status.
async fn http_check(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: not an http:// URL"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: shoal\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let mut head = vec![0u8; 64];
    let n = s
        .read(&mut head)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("GET {url}: not an HTTP answer"))?;
    if (200..300).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET {url}: status {code}"))
    }
}

/// Copies a child's output into a log file, rotating it at [`LOG_LIMIT`].
async fn pump<R: AsyncRead + Unpin>(mut from: R, path: PathBuf) {
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
    };
    let Ok(mut file) = open(&path) else {
        return;
    };
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if size + n as u64 > LOG_LIMIT {
            let _ = std::fs::rename(&path, path.with_extension("log.1"));
            match open(&path) {
                Ok(f) => file = f,
                Err(_) => return,
            }
            size = 0;
        }
        if std::io::Write::write_all(&mut file, &buf[..n]).is_err() {
            return;
        }
        size += n as u64;
    }
}

/// Kills process groups a previous run of the node left behind (it was
/// killed before it could stop them), recognised by their pid file and
/// command line.
fn reap_leftovers(root: &Path) -> BTreeMap<String, (i32, String)> {
    let mut adoptable = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return adoptable;
    };
    for e in entries.flatten() {
        let pidfile = e.path().join("pid");
        let Ok(bytes) = std::fs::read(&pidfile) else {
            continue;
        };
        let _ = std::fs::remove_file(&pidfile);
        let Ok(rec) = serde_json::from_slice::<PidFile>(&bytes) else {
            continue;
        };
        // The same pid and start time: the very process we started (a
        // recycled pid has another start time).
        if rec.start == 0 || start_time(rec.pid) != Some(rec.start) {
            continue;
        }
        let app = e.file_name().to_string_lossy().into_owned();
        if rec.outlive {
            // Kept for adoption; the pid file stays until it is decided.
            let _ = std::fs::write(&pidfile, &bytes);
            adoptable.insert(app, (rec.pid, rec.key));
            continue;
        }
        tracing::warn!(pid = rec.pid, %app, "killing a process left behind by a previous run");
        let _ = killpg(Pid::from_raw(rec.pid), Signal::SIGKILL);
    }
    adoptable
}

fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    })
}
