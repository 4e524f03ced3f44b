//! `shoal demo` as a newcomer runs it: an anchor, four nodes in two sites
//! and the sample app on this machine; a site cut off from the UI's demo
//! controls keeps running, takes a field engineer's edit while the
//! operator edits the fleet, merges when restored; Ctrl-C leaves nothing
//! running.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/cdp.rs"]
mod cdp;
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const WITHIN: Duration = Duration::from_secs(45);

fn messages(url: &str, token: &str, site: &str) -> Vec<String> {
    let d = api_get(&format!("{url}/api/demo"), token);
    d["apps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["site"] == site)
                .map(|x| x["message"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn all_show(url: &str, token: &str, site: &str, msg: &str) -> bool {
    let m = messages(url, token, site);
    m.len() == 2 && m.iter().all(|x| x == msg)
}

/// Processes whose command line or working directory mentions `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            if (cmd.contains(needle) || cwd.contains(needle)) && alive(pid.parse().unwrap()) {
                out.push(format!("{pid}: {cmd}"));
            }
        }
    }
    out
}

/// The demo process; on a failed test it still gets Ctrl-C (so it stops
/// its nodes), then SIGKILL.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_cut_edit_both_sides_merge_and_stop_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut demo = Command::new(bin())
        .args([
            "demo",
            "--dir",
            s(&dir),
            "--http",
            &format!("127.0.0.1:{port}"),
        ])
        .env("SHOAL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(tmp.path().join("demo.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut demo = Demo(demo);
    let mut token = String::new();
    let mut printed = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if let Some(t) = line.trim().strip_prefix("token:") {
            token = t.trim().to_string();
            break;
        }
    }
    assert!(
        token.starts_with("shoal-op-"),
        "no token printed: {printed}"
    );
    assert!(
        printed.contains(&format!("http://127.0.0.1:{port}/#token=")),
        "{printed}"
    );
    // Keep draining stdout so the demo never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let url = format!("http://127.0.0.1:{port}");

    assert!(
        wait_for(WITHIN, || all_show(
            &url,
            &token,
            "north",
            "Hello from the operator"
        ) && all_show(
            &url,
            &token,
            "south",
            "Hello from the operator"
        )),
        "the sample app did not start everywhere: {}",
        api_get(&format!("{url}/api/demo"), &token)
    );

    // Cut north off; edit on both sides.
    let (st, body) = http(
        "POST",
        &format!("{url}/api/demo/sites/north/cut"),
        Some(&token),
        Some(""),
    );
    assert_eq!(st, 200, "{body}");
    let edit = json!({ "config": "greeting", "key": "message", "value": "north, offline" });
    let (st, body) = http(
        "POST",
        &format!("{url}/api/demo/sites/north/edit"),
        Some(&token),
        Some(&edit.to_string()),
    );
    assert_eq!(st, 200, "{body}");
    let cfg = "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {name: greeting}\nspec:\n  data: {message: operator edit}\n";
    let body = json!({ "files": [{ "name": "greeting.yaml", "text": cfg }] });
    let (st, r) = http(
        "POST",
        &format!("{url}/api/apply"),
        Some(&token),
        Some(&body.to_string()),
    );
    assert_eq!(st, 200, "{r}");
    assert!(
        wait_for(WITHIN, || all_show(&url, &token, "south", "operator edit")),
        "south did not get the operator's edit: {:?}",
        messages(&url, &token, "south")
    );
    assert!(
        wait_for(WITHIN, || all_show(&url, &token, "north", "north, offline")),
        "north's nodes did not both take their engineer's edit: {:?}",
        messages(&url, &token, "north")
    );
    let site = api_get(&format!("{url}/api/sites/north"), &token);
    assert!(
        site["overrides"]["configs"]["greeting"].is_null(),
        "the cut let the site edit through: {site}"
    );

    // Restore: the anchor gets north's edit; each side keeps what it should.
    let (st, _) = http(
        "POST",
        &format!("{url}/api/demo/sites/north/restore"),
        Some(&token),
        Some(""),
    );
    assert_eq!(st, 200);
    assert!(
        wait_for(Duration::from_secs(90), || {
            api_get(&format!("{url}/api/sites/north"), &token)["overrides"]["configs"]["greeting"]["data"]
                ["message"]
                == "north, offline"
        }),
        "north's edit never reached the anchor"
    );
    assert!(all_show(&url, &token, "north", "north, offline"));
    assert!(all_show(&url, &token, "south", "operator edit"));
    let timeline = api_get(&format!("{url}/api/timeline?subject=site/north"), &token);
    assert!(
        timeline["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "merged" && e["text"].as_str().unwrap().contains("eng-north")),
        "{timeline}"
    );

    if std::env::var("SHOAL_SCREENSHOTS").is_ok() {
        let mut b = cdp::Browser::launch(1280, 860).unwrap();
        b.navigate(&format!("{url}/#token={token}")).unwrap();
        b.wait_until("!!document.querySelector('#total-nodes')", WITHIN)
            .unwrap();
        b.eval("location.hash = '#/demo'").unwrap();
        b.wait_until("!!document.querySelector('#demo-apps')", WITHIN)
            .unwrap();
        let dir = std::env::var("SHOAL_SCREENSHOTS").unwrap();
        b.screenshot(&std::path::Path::new(&dir).join("demo.png"))
            .unwrap();
    }

    // Ctrl-C: everything stops, nothing is left running.
    let pids = processes_with(s(&dir));
    assert_eq!(
        pids.len(),
        9,
        "the demo, 4 nodes and 4 apps expected: {pids:?}"
    );
    let st = Command::new("kill")
        .args(["-INT", &demo.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(st) = demo.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    let left = processes_with(s(&dir));
    assert!(left.is_empty(), "left running: {left:?}");
}
