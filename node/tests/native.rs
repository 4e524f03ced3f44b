//! The native runtime with real processes: start, crash and restart with
//! backoff, failing health checks, a config change, removal, shutdown
//! without orphans, and bad input reported as failed states.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use crdt_state::fleet::model::{AppSpec, HealthCheck, NativeSpec, RestartPolicy, WorkloadState};
use crdt_state::fleet::placement::Workload;
use node::runtime::Runtime;
use node::runtime::native::Native;

fn workload(app: &str, command: &[&str], files: &[(&str, &str)]) -> Workload {
    Workload {
        app: app.into(),
        spec: AppSpec {
            native: Some(NativeSpec {
                command: command.iter().map(|s| s.to_string()).collect(),
                ..NativeSpec::default()
            }),
            ..AppSpec::default()
        },
        files: files
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        artifacts: Default::default(),
        site_api: None,
        revision: String::new(),
    }
}

async fn until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn pid_of(dir: &Path, app: &str) -> Option<i32> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(app).join("pid")).ok()?).ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn log(dir: &Path, app: &str) -> String {
    std::fs::read_to_string(dir.join(app).join("stdout.log")).unwrap_or_default()
}

fn state(rt: &Native, app: &str) -> Option<(WorkloadState, Option<String>, u32)> {
    rt.status()
        .get(app)
        .map(|r| (r.state, r.reason.clone(), r.restarts))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_restarts_rerenders_and_stops_real_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut rt = Native::new(dir.clone());
    let web = workload(
        "web",
        &["/bin/sh", "-c", "cat conf.txt; echo; exec sleep 60"],
        &[("conf.txt", "v1")],
    );
    let mut crash = workload("crash", &["/bin/sh", "-c", "echo boom; exit 3"], &[]);
    crash.spec.native.as_mut().unwrap().restart = RestartPolicy::Always;
    rt.reconcile(&[web.clone(), crash.clone()]);

    // Started, with its config file rendered and its output logged.
    assert!(until(Duration::from_secs(10), || log(&dir, "web").contains("v1")).await);
    assert_eq!(state(&rt, "web").unwrap().0, WorkloadState::Running);
    let pid1 = pid_of(&dir, "web").unwrap();
    assert!(alive(pid1));

    // A crashing app is restarted with backoff (1 s, then 2 s, ...).
    let started = std::time::Instant::now();
    assert!(
        until(Duration::from_secs(10), || state(&rt, "crash")
            .is_some_and(|s| s.2 >= 2))
        .await
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "restarted without backoff"
    );
    let (st, reason, _) = state(&rt, "crash").unwrap();
    assert!(st == WorkloadState::Failed || st == WorkloadState::Running);
    if st == WorkloadState::Failed {
        assert_eq!(reason.as_deref(), Some("exited with code 3"));
    }

    // A config change restarts the app with the new file content.
    let mut web2 = web.clone();
    web2.files.insert("conf.txt".into(), "v2".into());
    rt.reconcile(&[web2.clone(), crash.clone()]);
    assert!(until(Duration::from_secs(15), || log(&dir, "web").contains("v2")).await);
    assert!(
        until(Duration::from_secs(10), || !alive(pid1)).await,
        "old process still runs"
    );
    let pid2 = pid_of(&dir, "web").unwrap();
    assert_ne!(pid1, pid2);

    // The same spec again changes nothing.
    rt.reconcile(&[web2.clone(), crash.clone()]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pid_of(&dir, "web"), Some(pid2));

    // Removed from the desired state: stopped.
    rt.reconcile(&[web2.clone()]);
    assert!(until(Duration::from_secs(10), || state(&rt, "crash").is_none()).await);
    assert!(alive(pid2));

    // Node shutdown: nothing left behind, grandchildren included.
    let family = workload(
        "family",
        &["/bin/sh", "-c", "sleep 60 & echo $! > child.pid; wait"],
        &[],
    );
    rt.reconcile(&[web2, family]);
    assert!(
        until(Duration::from_secs(10), || std::fs::read_to_string(
            dir.join("family/child.pid")
        )
        .is_ok_and(|s| !s.trim().is_empty()))
        .await
    );
    let grandchild: i32 = std::fs::read_to_string(dir.join("family/child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let family_pid = pid_of(&dir, "family").unwrap();
    assert!(alive(grandchild) && alive(family_pid));
    rt.shutdown().await;
    for pid in [pid2, family_pid, grandchild] {
        assert!(
            until(Duration::from_secs(3), || !alive(pid)).await,
            "{pid} left behind"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_checks_restart_the_app() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rt = Native::new(tmp.path().to_path_buf());
    let mut w = workload("sick", &["/bin/sleep", "60"], &[]);
    // Nothing listens on port 1.
    w.spec.native.as_mut().unwrap().health = Some(HealthCheck {
        tcp: Some("127.0.0.1:1".into()),
        period_s: 1,
        timeout_s: 1,
        failures: 2,
        ..HealthCheck::default()
    });
    rt.reconcile(&[w]);
    assert!(
        until(Duration::from_secs(15), || state(&rt, "sick")
            .is_some_and(|s| s.2 >= 1))
        .await,
        "{:?}",
        state(&rt, "sick")
    );
    let (_, reason, _) = state(&rt, "sick").unwrap();
    let reason = reason.unwrap_or_default();
    assert!(
        reason.contains("health check failed 2 times: tcp 127.0.0.1:1"),
        "{reason}"
    );
    // And a passing check keeps it running: an exec check that succeeds.
    let mut ok = workload("fine", &["/bin/sleep", "60"], &[]);
    ok.spec.native.as_mut().unwrap().health = Some(HealthCheck {
        exec: vec!["/bin/true".into()],
        period_s: 1,
        timeout_s: 1,
        failures: 1,
        ..HealthCheck::default()
    });
    rt.reconcile(&[ok]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (st, _, restarts) = state(&rt, "fine").unwrap();
    assert_eq!((st, restarts), (WorkloadState::Running, 0));
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_failed_state_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rt = Native::new(tmp.path().to_path_buf());
    let missing = workload("missing", &["/no/such/program"], &[]);
    let escape = workload("escape", &["/bin/true"], &[("../../etc/evil", "x")]);
    let mut kube = workload("k", &["/bin/true"], &[]);
    kube.spec.runtime = crdt_state::fleet::model::RuntimeKind::Kube;
    kube.spec.native = None;
    rt.reconcile(&[missing, escape, kube]);
    assert!(
        until(Duration::from_secs(5), || {
            let s = rt.status();
            s.get("missing")
                .is_some_and(|r| r.state == WorkloadState::Failed)
                && s.get("escape")
                    .is_some_and(|r| r.state == WorkloadState::Failed)
        })
        .await
    );
    let s = rt.status();
    assert_eq!(
        s["missing"].reason.as_deref(),
        Some("cannot start /no/such/program: no such program")
    );
    assert!(
        s["escape"]
            .reason
            .as_deref()
            .unwrap()
            .contains("escapes the app directory")
    );
    assert!(!tmp.path().join("../etc/evil").exists());
    assert_eq!(s["k"].state, WorkloadState::Failed);
    assert!(s["k"].reason.as_deref().unwrap().contains("kube"));
    rt.shutdown().await;
}

#[test]
fn leftovers_of_a_killed_node_are_reaped_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("old");
    std::fs::create_dir_all(&app).unwrap();
    let mut child = std::process::Command::new("/bin/sleep")
        .arg("61")
        .process_group(0)
        .spawn()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
    let start: u64 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let rec =
        serde_json::json!({"pid": child.id(), "cmdline": ["/bin/sleep", "61"], "start": start});
    std::fs::write(app.join("pid"), rec.to_string()).unwrap();
    let _rt = Native::new(tmp.path().to_path_buf());
    let status = child.wait().unwrap();
    assert!(!status.success(), "the leftover was not killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outlive_node_app_survives_the_node_and_is_adopted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut w = workload("relay", &["/bin/sh", "-c", "echo up; exec sleep 60"], &[]);
    w.spec.native.as_mut().unwrap().outlive_node = true;
    let plain = workload("plain", &["/bin/sleep", "60"], &[]);
    let mut rt = Native::new(dir.clone());
    rt.reconcile(&[w.clone(), plain.clone()]);
    assert!(
        until(Duration::from_secs(10), || pid_of(&dir, "relay")
            .is_some_and(alive)
            && pid_of(&dir, "plain").is_some_and(alive))
        .await
    );
    let (relay, plain_pid) = (
        pid_of(&dir, "relay").unwrap(),
        pid_of(&dir, "plain").unwrap(),
    );
    rt.shutdown().await;
    drop(rt);
    assert!(until(Duration::from_secs(3), || !alive(plain_pid)).await);
    assert!(
        alive(relay),
        "an outlive_node app was stopped with the node"
    );
    // The next start adopts it instead of starting a second copy.
    let mut rt = Native::new(dir.clone());
    rt.reconcile(&[w.clone()]);
    assert!(
        until(Duration::from_secs(5), || state(&rt, "relay")
            .is_some_and(|s| s.0 == WorkloadState::Running))
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pid_of(&dir, "relay"), Some(relay));
    assert_eq!(log(&dir, "relay").matches("up").count(), 1, "started twice");
    // Removed from the desired state: the adopted process is stopped.
    rt.reconcile(&[]);
    assert!(until(Duration::from_secs(8), || !alive(relay)).await);
}
