//! Staged rollouts with real processes (ADR 0011): an anchor and four
//! nodes on loopback with the native runtime; the canary site's node
//! reaches the anchor only through a user-space link the test can cut.
//!
//! - A good version goes through every wave, each opened by the anchor's
//!   gate only after the waves before it were healthy long enough.
//! - A version whose process exits at once is rolled back on the canary by
//!   the node itself; the anchor halts the rollout before wave 1, and the
//!   timeline and `shoal rollout status` say why.
//! - A version that fails a few seconds in, on a canary cut off right after
//!   it updated, is rolled back there with no link to anybody; once the
//!   link returns, the anchor halts that rollout too.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::Path;
use std::time::Duration;

use simulations::udp_link::{LinkConfig, UdpLink};
use support::*;

const WITHIN: Duration = Duration::from_secs(60);

/// The app at `version`: a shell named `web-<version>` running `script`.
fn app(version: &str, script: &str, healthy_for: u64) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: web}}\nspec:\n  version: {version}\n  native:\n    command: [/bin/sh, -c, '{script}', web-{version}]\n  rollout:\n    waves: [{{sites: [canary]}}, {{percent: 50}}, {{percent: 100}}]\n    healthy_for_s: {healthy_for}\n"
    )
}

/// The version of `web` a node's own process runs.
fn running(node_dir: &Path) -> Option<String> {
    running_version(node_dir, "web")
}

/// The rollout's status, as the anchor's API gives it.
fn status(url: &str, token: &str) -> serde_json::Value {
    api_get(&format!("{url}/api/rollouts/web"), token)
}

#[test]
fn a_rollout_goes_wave_by_wave_and_a_failing_version_is_rolled_back_on_the_canary() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let token = operator_token(&anchor_dir, "ops");
    // The canary is enrolled offline: it reaches the anchor only through a
    // link the test can cut.
    let c1 = bundle_node(&anchor_dir, root, "c1", "canary");
    let port = free_udp_port();
    let _anchor = anchor_with_http(&anchor_dir, port);
    let url = http_url(&anchor_dir);
    let anchor_id = anchor_id(&anchor_dir);
    let link = UdpLink::start(
        "127.0.0.1:0".parse().unwrap(),
        format!("127.0.0.1:{port}").parse().unwrap(),
        LinkConfig::default(),
    )
    .unwrap();
    let _canary = Daemon::start(
        "node",
        &c1,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            format!(
                "/ip4/127.0.0.1/udp/{}/quic-v1/p2p/{anchor_id}",
                link.addr().port()
            ),
        ],
        None,
    );
    let mut plant = Vec::new();
    let mut daemons = Vec::new();
    for n in ["p1", "p2", "p3"] {
        let d = root.join(n);
        enroll(&anchor_dir, &d, n, "plant");
        daemons.push(Daemon::start(
            "node",
            &d,
            &["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()],
            None,
        ));
        plant.push(d);
    }
    assert!(all_connected(
        &anchor_dir,
        &["c1", "p1", "p2", "p3"],
        WITHIN
    ));
    let every: Vec<&Path> = std::iter::once(c1.as_path())
        .chain(plant.iter().map(|p| p.as_path()))
        .collect();
    let apply = |text: &str| {
        let f = write(root, "web.yaml", text);
        ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&f)]);
    };
    let all_run = |v: &str| {
        wait_for(WITHIN, || {
            every.iter().all(|d| running(d).as_deref() == Some(v))
        })
    };

    // v1: a new app goes everywhere at once.
    apply(&app("v1", "sleep 3600", 2));
    assert!(all_run("v1"), "v1 did not start everywhere");

    // v2: wave by wave.
    apply(&app("v2", "sleep 3600", 2));
    assert!(
        wait_for(WITHIN, || status(&url, &token)["phase"] == "done"),
        "v2's rollout did not finish: {}",
        status(&url, &token)
    );
    assert!(all_run("v2"));
    let st = status(&url, &token);
    let decisions: Vec<(String, i64)> = st["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d[0].as_str().unwrap().to_string(),
                d[1]["at"].as_i64().unwrap(),
            )
        })
        .collect();
    let names: Vec<&str> = decisions.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["open wave 1", "open wave 2", "done"], "{st}");
    // Each gate waited for the waves before it to be healthy for 2 s.
    assert!(decisions[1].1 - decisions[0].1 >= 2, "{decisions:?}");
    assert!(decisions[2].1 - decisions[1].1 >= 2, "{decisions:?}");
    assert_eq!(st["waves"][1]["nodes"], 2, "{st}");
    assert!(
        st["decisions"][0][1]["reason"]
            .as_str()
            .unwrap()
            .contains("healthy for 2 s")
    );

    // v3 exits at once: the canary rolls it back by itself, the anchor halts.
    apply(&app("v3", "exit 3", 2));
    assert!(
        wait_for(WITHIN, || status(&url, &token)["phase"] == "halted"),
        "v3's rollout was not halted: {}",
        status(&url, &token)
    );
    let st = status(&url, &token);
    let why = st["waves"][0]["failures"]["c1"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains("rolled back") && why.contains("exited with code 3"),
        "{st}"
    );
    assert_eq!(st["waves"][1]["open"], false, "{st}");
    assert!(wait_for(WITHIN, || running(&c1).as_deref() == Some("v2")));
    // The plant never ran v3: its wave never opened (checked above), and
    // every plant node still runs v2.
    for d in &plant {
        assert_eq!(running(d).as_deref(), Some("v2"), "{}", d.display());
    }
    let timeline = api_get(&format!("{url}/api/timeline"), &token).to_string();
    assert!(timeline.contains("web v3: halted"), "{timeline}");
    assert!(timeline.contains("c1: rolled back"), "{timeline}");
    let text = ok(&[
        "rollout", "status", "web", "--anchor", &url, "--token", &token,
    ]);
    assert!(
        text.contains("halted") && text.contains("failed in wave 0: c1"),
        "{text}"
    );

    // v4 fails 2 s in; the canary is cut off once it runs v4, and rolls
    // back with no link. A long gate keeps wave 1 closed meanwhile.
    apply(&app("v4", "sleep 2; exit 4", 60));
    assert!(
        wait_for(WITHIN, || running(&c1).as_deref() == Some("v4")),
        "the canary did not start v4"
    );
    link.set_cut(true);
    assert!(
        wait_for(WITHIN, || running(&c1).as_deref() == Some("v2")),
        "the cut-off canary did not roll v4 back"
    );
    // The anchor learns it once the link returns.
    link.set_cut(false);
    assert!(
        wait_for(WITHIN, || status(&url, &token)["phase"] == "halted"),
        "v4's rollout was not halted: {}",
        status(&url, &token)
    );
    let st = status(&url, &token);
    assert!(
        st["waves"][0]["failures"]["c1"]
            .as_str()
            .unwrap_or_default()
            .contains("exited with code 4"),
        "{st}"
    );
    for d in &plant {
        assert_eq!(running(d).as_deref(), Some("v2"), "{}", d.display());
    }
    // An operator aborts it: nothing changes for nodes already back.
    let out = ok(&[
        "rollout", "abort", "web", "--anchor", &url, "--token", &token,
    ]);
    assert!(out.contains("aborted"), "{out}");
    assert_eq!(status(&url, &token)["phase"], "aborted");
}
