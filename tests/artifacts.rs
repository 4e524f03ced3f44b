//! Artifacts with real processes over real QUIC on loopback: a file pushed
//! at the anchor reaches a node, verified group by group, and the app that
//! names it reads it at the path it was given; a new version replaces it
//! and the app switches only once the new file is whole.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

const WITHIN: Duration = Duration::from_secs(60);

fn reader_app(artifact: &str, copy: &Path) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: reader}}\nspec:\n  native:\n    command: [/bin/sh, -c, 'cmp \"$SHOAL_ARTIFACT_MODEL\" {} && echo SAME {artifact}; exec sleep 3600']\n  artifacts: {{model: {artifact}}}\n",
        copy.display()
    )
}

/// An anchor on a random loopback port.
fn anchor_on_loopback(dir: &Path) -> Daemon {
    Daemon::start(
        "anchor",
        dir,
        &["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()],
        None,
    )
}

#[test]
fn an_artifact_reaches_a_node_verified_and_the_app_switches_when_the_new_one_is_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let anchor = anchor_on_loopback(&anchor_dir);
    let nd = root.join("n1");
    enroll(&anchor_dir, &nd, "n1", "s1");
    let node = Daemon::start(
        "node",
        &nd,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            anchor.addr_on("127.0.0.1"),
        ],
        None,
    );

    // A second node whose blob store may hold 1 MiB only.
    let small = root.join("n2");
    enroll(&anchor_dir, &small, "n2", "s2");
    let small_node = Daemon::start(
        "node",
        &small,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            anchor.addr_on("127.0.0.1"),
            "--blob-quota".into(),
            "1M".into(),
        ],
        None,
    );

    // 5 MiB and a tail: 321 groups, the last one short.
    let v3 = pseudo_random(5 * 1024 * 1024 + 1234, 3);
    let v3_file = root.join("model-v3.onnx");
    std::fs::write(&v3_file, &v3).unwrap();
    push_artifact(&anchor_dir, &v3_file, "model-v3");
    let app = write(root, "reader.yaml", &reader_app("model-v3", &v3_file));
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&app)]);
    let log = nd.join("apps/reader/stdout.log");
    assert!(
        wait_for(WITHIN, || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("SAME model-v3"))),
        "the app did not read model-v3: {} / node: {}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        node.log_text()
    );
    let h3 = blobs::Hash::of(&v3).to_string();
    let blob = nd.join("blobs").join(&h3);
    assert_eq!(std::fs::read(&blob).unwrap(), v3, "the node's copy");
    // And under the app's directory, as `artifacts/<name>`.
    let link = nd.join("apps/reader/artifacts/model");
    assert_eq!(std::fs::read_link(&link).unwrap(), blob);
    assert_eq!(std::fs::read(&link).unwrap(), v3);
    // The small node says the artifact does not fit, writes none of it,
    // and does not start the app.
    let refusals = |n: &Daemon| {
        n.log_text()
            .lines()
            .filter(|l| l.contains("blob not kept here") && l.contains("quota"))
            .count()
    };
    assert!(
        wait_for(WITHIN, || refusals(&small_node) == 1),
        "n2: {}",
        small_node.log_text()
    );
    assert!(!small.join("blobs").join(&h3).exists());
    assert!(!small.join(format!("blobs/{h3}.part")).exists());
    assert!(!small.join("apps/reader/stdout.log").exists());

    // The anchor sees, per node, how much each holds and from whom it came,
    // or why it does not keep it (from the nodes' reports).
    let nodes_of = |name: &str| get(&anchor_dir, "artifacts")[name]["nodes"].clone();
    assert!(
        wait_for(WITHIN, || {
            let n = nodes_of("model-v3");
            n["n1"]["held"].as_u64() == Some(v3.len() as u64)
                && n["n2"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("quota"))
        }),
        "holdings: {}",
        nodes_of("model-v3")
    );
    let n1 = nodes_of("model-v3")["n1"].clone();
    assert_eq!(n1["hash"], h3.as_str());
    let from: u64 = n1["from"]
        .as_object()
        .expect("from whom")
        .values()
        .filter_map(|v| v.as_u64())
        .sum();
    assert_eq!(from, v3.len() as u64, "every byte from a named peer: {n1}");
    let table = ok(&["get", "artifacts", "--data-dir", s(&anchor_dir)]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("n1") && l.contains("whole")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("n2") && l.contains("not kept")),
        "{table}"
    );

    // A new version: the app keeps reading v3 until v4 is whole, then
    // switches.
    let v4 = pseudo_random(3 * 1024 * 1024, 4);
    let v4_file = root.join("model-v4.onnx");
    std::fs::write(&v4_file, &v4).unwrap();
    push_artifact(&anchor_dir, &v4_file, "model-v4");
    let app = write(root, "reader.yaml", &reader_app("model-v4", &v4_file));
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&app)]);
    assert!(
        wait_for(WITHIN, || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("SAME model-v4"))),
        "the app did not switch to model-v4: {} / node: {}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        node.log_text()
    );
    // It never ran against a file that was not whole: every line the app
    // wrote says its file was the one named.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().all(|l| l.starts_with("SAME ")),
        "the app saw a file that was not the artifact: {text}"
    );
    // (`cmp` says "differ" on standard output, a missing file on standard
    // error.)
    let err = std::fs::read_to_string(nd.join("apps/reader/stderr.log")).unwrap_or_default();
    assert!(!err.contains("cmp:"), "the app ran without its file: {err}");
    assert!(
        nd.join("blobs")
            .join(blobs::Hash::of(&v4).to_string())
            .exists()
    );
    assert_eq!(
        std::fs::read(&link).unwrap(),
        v4,
        "the link follows the app"
    );
    // n2 refused each blob once (v3, then v4). A later change of the fleet
    // makes it reconcile again; the refusal is remembered, so it does not
    // fetch the list and refuse once more.
    assert!(
        wait_for(WITHIN, || refusals(&small_node) == 2),
        "n2: {}",
        small_node.log_text()
    );
    let cfg = write(
        root,
        "c.yaml",
        "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {name: later}\nspec: {data: {k: v}}\n",
    );
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&cfg)]);
    assert!(wait_for(WITHIN, || get(&small, "configs")
        .get("later")
        .is_some()));
    // Without the memory a refusal follows a reconcile by the time it takes
    // to ask a peer what it holds and for the list: under a second on
    // loopback (the first one came within a second of the push). Two
    // seconds is twice that.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(refusals(&small_node), 2, "n2: {}", small_node.log_text());

    // model-v3 deleted: no app names it and no artifact is it any more, so
    // the anchor and the node remove its blob. (Both copies are set an hour
    // old first: a blob written in the last 10 minutes is kept, since a
    // push copies the blob before it applies its Artifact.)
    let h4 = blobs::Hash::of(&v4).to_string();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    for dir in [&nd, &anchor_dir] {
        let f = std::fs::File::open(dir.join("blobs").join(&h3)).unwrap();
        f.set_modified(old).unwrap();
    }
    ok(&[
        "delete",
        "artifact",
        "model-v3",
        "--data-dir",
        s(&anchor_dir),
    ]);
    for dir in [&nd, &anchor_dir] {
        assert!(
            wait_for(WITHIN, || !dir.join("blobs").join(&h3).exists()),
            "{} still holds model-v3: {}",
            dir.display(),
            node.log_text()
        );
        assert!(dir.join("blobs").join(&h4).exists(), "model-v4 is kept");
    }
    drop((node, small_node, anchor));
}

/// A transfer interrupted twice, by a kill -9 of the receiving node and
/// then of the anchor serving it, goes on from what reached the disk: the
/// node reads each byte of the artifact once, plus at most one group per
/// interruption.
#[test]
fn a_transfer_killed_on_either_side_resumes_reading_each_byte_once() {
    const GROUP: u64 = 16 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let port = free_udp_port();
    let anchor_args = vec![
        "--listen".to_string(),
        format!("/ip4/127.0.0.1/udp/{port}/quic-v1"),
    ];
    let mut anchor = Daemon::start("anchor", &anchor_dir, &anchor_args, None);
    let nd = root.join("n1");
    enroll(&anchor_dir, &nd, "n1", "s1");
    let node_args = vec![
        "--listen".to_string(),
        "/ip4/127.0.0.1/udp/0/quic-v1".into(),
        "--peer".into(),
        anchor.addr_on("127.0.0.1"),
    ];
    let filter = Some("info,libp2p=warn,daemon::blobs=debug");
    let start_node = || Daemon::start_with_log("node", &nd, &node_args, None, filter);
    let mut node = start_node();

    let data = pseudo_random(48 * 1024 * 1024 + 777, 9);
    let size = data.len() as u64;
    let file = root.join("big.bin");
    std::fs::write(&file, &data).unwrap();
    push_artifact(&anchor_dir, &file, "big");
    let app = write(root, "reader.yaml", &reader_app("big", &file));
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&app)]);

    // A third of the way: kill -9 the node, start it again.
    assert!(
        wait_for(WITHIN, || blob_bytes_received(&node.log_text()) >= size / 3),
        "no progress: {}",
        node.log_text()
    );
    node.kill();
    let first = node.log_text();
    let part = nd.join(format!("blobs/{}.part", blobs::Hash::of(&data)));
    assert!(part.exists(), "the partial blob stays");
    assert!(
        blob_bytes_received(&first) < size,
        "killed after the whole blob arrived: the test measured nothing"
    );
    let mut node = start_node();

    // Two thirds of the way (in all): kill -9 the anchor, start it again
    // on the same address.
    assert!(
        wait_for(WITHIN, || blob_bytes_received(&first)
            + blob_bytes_received(&node.log_text())
            >= 2 * size / 3),
        "no progress after the node's restart: {}",
        node.log_text()
    );
    anchor.kill();
    let mut anchor = Daemon::start("anchor", &anchor_dir, &anchor_args, None);

    let out = nd.join("apps/reader/stdout.log");
    assert!(
        wait_for(Duration::from_secs(120), || std::fs::read_to_string(&out)
            .is_ok_and(|l| l.contains("SAME big"))),
        "the app did not read the artifact: {} / node: {}",
        std::fs::read_to_string(&out).unwrap_or_default(),
        node.log_text()
    );
    let second = node.log_text();
    let total = blob_bytes_received(&first) + blob_bytes_received(&second);
    // Each group is logged once it is read whole, before it is written: a
    // group logged but not written when the node was killed is read again
    // (the one group the kill may cost); a group being read when either
    // side was killed is not logged (it is the group the anchor's kill may
    // cost, and is not counted here).
    assert!(
        total >= size,
        "every byte arrives at least once: {total} < {size}"
    );
    assert!(
        total <= size + GROUP,
        "read {total} bytes for a blob of {size}: {} more than once",
        total - size
    );
    println!(
        "resume: {size} bytes, read {total} in all over two interruptions ({} extra)",
        total - size
    );
    assert_eq!(
        std::fs::read(nd.join("blobs").join(blobs::Hash::of(&data).to_string())).unwrap(),
        data
    );
    anchor.stop();
    node.stop();
}

/// A neighbour with a valid certificate that serves corrupted groups (its
/// copy was damaged on disk after it verified it): the node that fetches
/// from it detects the first bad group, names the neighbour in a security
/// event, takes the rest from the anchor, and its app reads only the true
/// bytes.
#[test]
fn a_neighbour_serving_corrupt_groups_is_cut_off_and_the_anchor_serves_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let token = operator_token(&anchor_dir, "op");
    let anchor = Daemon::start(
        "anchor",
        &anchor_dir,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--insecure-http".into(),
        ],
        None,
    );
    let (d1, d2) = (root.join("n1"), root.join("n2"));
    enroll(&anchor_dir, &d1, "n1", "s1");
    enroll(&anchor_dir, &d2, "n2", "s1");
    let n1 = Daemon::start(
        "node",
        &d1,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            anchor.addr_on("127.0.0.1"),
        ],
        None,
    );

    let data = pseudo_random(4 * 1024 * 1024 + 99, 21);
    let file = root.join("m.bin");
    std::fs::write(&file, &data).unwrap();
    push_artifact(&anchor_dir, &file, "m");
    let app = |name: &str, node: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: {name}}}\nspec:\n  selector: {{node: {node}}}\n  native:\n    command: [/bin/sh, -c, 'cmp \"$SHOAL_ARTIFACT_M\" {} && echo SAME; exec sleep 3600']\n  artifacts: {{m: m}}\n",
            file.display()
        )
    };
    let a1 = write(root, "a1.yaml", &app("r1", "n1"));
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&a1)]);
    let hash = blobs::Hash::of(&data).to_string();
    let n1_blob = d1.join("blobs").join(&hash);
    assert!(
        wait_for(WITHIN, || std::fs::read(&n1_blob).is_ok_and(|b| b == data)),
        "n1 did not get the artifact: {}",
        n1.log_text()
    );
    // n1's copy goes bad on its disk: one byte of group 40 of 257.
    {
        use std::os::unix::fs::FileExt;
        let mut perm = std::fs::metadata(&n1_blob).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&n1_blob, perm).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&n1_blob)
            .unwrap();
        f.write_all_at(&[data[40 * 16384 + 7] ^ 0xff], 40 * 16384 + 7)
            .unwrap();
    }

    // n2 knows n1 as a neighbour (same site) and the anchor; it asks the
    // neighbour first.
    let n2 = Daemon::start_with_log(
        "node",
        &d2,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            anchor.addr_on("127.0.0.1"),
            "--peer".into(),
            n1.addr_on("127.0.0.1"),
        ],
        None,
        Some("info,libp2p=warn,daemon::blobs=debug"),
    );
    assert!(
        wait_for(WITHIN, || n2.log_text().contains("name=n1")),
        "n2 never admitted n1: {}",
        n2.log_text()
    );
    let a2 = write(root, "a2.yaml", &app("r2", "n2"));
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&a2)]);
    let out = d2.join("apps/r2/stdout.log");
    assert!(
        wait_for(WITHIN, || std::fs::read_to_string(&out)
            .is_ok_and(|l| l.contains("SAME"))),
        "n2's app did not read the true artifact: {} / n2: {}",
        std::fs::read_to_string(&out).unwrap_or_default(),
        n2.log_text()
    );
    assert_eq!(std::fs::read(d2.join("blobs").join(&hash)).unwrap(), data);
    let log = n2.log_text();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("security event"))
        .collect();
    assert_eq!(events.len(), 1, "one event for the one liar: {events:?}");
    assert!(
        events[0].contains("n1 (") && events[0].contains("group 40"),
        "the event names n1 and the group: {}",
        events[0]
    );
    // The anchor's security log shows what n2 saw, from n2's report.
    let url = http_url(&anchor_dir);
    let reported = || {
        api_get(&format!("{url}/api/security"), &token)["items"]
            .as_array()
            .is_some_and(|items| {
                items.iter().any(|e| {
                    let (who, why) = (e["source"].as_str(), e["reason"].as_str());
                    who.is_some_and(|w| w.starts_with("n1 (") && w.ends_with("(seen by n2)"))
                        && why.is_some_and(|r| r.contains("group 40"))
                })
            })
    };
    assert!(
        wait_for(WITHIN, reported),
        "the anchor's security log: {}",
        api_get(&format!("{url}/api/security"), &token)
    );
    // Some groups came from n1 before the bad one, the rest from the
    // anchor; the report says so.
    let from = get(&anchor_dir, "artifacts")["m"]["nodes"]["n2"]["from"].clone();
    assert!(
        wait_for(WITHIN, || {
            let f = get(&anchor_dir, "artifacts")["m"]["nodes"]["n2"]["from"].clone();
            f.as_object().is_some_and(|m| {
                m.keys().any(|k| k.starts_with("anchor"))
                    && m.values().filter_map(|v| v.as_u64()).sum::<u64>() == data.len() as u64
            })
        }),
        "n2's report: {from}"
    );
    // The app's stdout never said anything else: it never ran on a bad file.
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.lines().all(|l| l == "SAME"), "{text}");
    drop((n2, n1, anchor));
}
