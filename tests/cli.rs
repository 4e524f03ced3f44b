//! The `shoal` binary as a user runs it: exit codes, one-line errors,
//! stdin manifests, identities, bundles and kill -9 at any moment.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env_remove("SHOAL_DATA_DIR")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = shoal(args);
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command expected to fail; returns its one stderr line.
fn fails(args: &[&str]) -> String {
    let out = shoal(args);
    assert!(!out.status.success(), "shoal {args:?} succeeded");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

const APP: &str = "apiVersion: shoal.dev/v1
kind: App
metadata: { name: inspect }
spec:
  selector: { site: a }
  native: { command: [/bin/sleep, \"100\"] }
---
apiVersion: shoal.dev/v1
kind: Node
metadata: { name: n1 }
spec: { site: a, labels: { zone: north } }
";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn operator_flow_with_stdin_and_env() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("op");
    let d = d.to_str().unwrap();
    assert!(
        ok(&["fleet", "init", "--data-dir", d, "--name", "grid"]).contains("fleet grid created")
    );
    fails(&["fleet", "init", "--data-dir", d]).contains("already holds a fleet");

    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["apply", "--data-dir", d, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(APP.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("app/inspect configured"));

    let apps: serde_json::Value =
        serde_json::from_str(&ok(&["get", "apps", "--data-dir", d, "-o", "json"])).unwrap();
    assert_eq!(apps["inspect"]["selector"]["site"], "a");
    let yaml = ok(&["get", "nodes", "--data-dir", d, "-o", "yaml"]);
    assert!(yaml.contains("zone: north"), "{yaml}");

    // SHOAL_DATA_DIR stands in for --data-dir.
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["get", "nodes"])
        .env("SHOAL_DATA_DIR", d)
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("n1") && table.contains("zone=north"),
        "{table}"
    );

    ok(&["delete", "--data-dir", d, "app", "inspect"]);
    assert_eq!(
        ok(&["get", "apps", "--data-dir", d, "-o", "json"]).trim(),
        "{}"
    );
    let err = fails(&["delete", "--data-dir", d, "app", "inspect"]);
    assert!(err.contains("not found: App inspect"), "{err}");
    let err = fails(&["get", "pods", "--data-dir", d]);
    assert!(err.contains("cannot get \"pods\""), "{err}");
}

#[test]
fn a_bad_manifest_names_file_document_and_field_and_applies_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("op");
    let d = d.to_str().unwrap();
    ok(&["fleet", "init", "--data-dir", d]);
    let good = write(tmp.path(), "good.yaml", APP);
    let bad = write(
        tmp.path(),
        "bad.yaml",
        &APP.replace(
            "labels: { zone: north }",
            "labels: { zone: north }, replicas: 2",
        ),
    );
    let err = fails(&["apply", "--data-dir", d, "-f", &good, "-f", &bad]);
    assert!(
        err.contains("bad.yaml: document 2: spec.replicas: unknown field `replicas`"),
        "{err}"
    );
    assert_eq!(
        ok(&["get", "apps", "--data-dir", d, "-o", "json"]).trim(),
        "{}"
    );
    let err = fails(&["apply", "--data-dir", d, "-f", "/nonexistent.yaml"]);
    assert!(err.contains("/nonexistent.yaml"), "{err}");
    let err = fails(&["get", "apps", "--data-dir", "/nonexistent-dir"]);
    assert!(err.contains("holds no Shoal store"), "{err}");
}

#[test]
fn site_engineer_edits_offline_and_bundles_merge_with_conflicts() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let (op, eng) = (t("op"), t("eng"));
    ok(&["fleet", "init", "--data-dir", &op]);
    let app = write(tmp.path(), "app.yaml", APP);
    ok(&["apply", "--data-dir", &op, "-f", &app]);
    ok(&[
        "identity",
        "create",
        "--data-dir",
        &op,
        "--role",
        "site-engineer",
        "--site",
        "a",
        "--name",
        "eve",
        "--out",
        &t("eve.json"),
    ]);
    ok(&["identity", "use", "--data-dir", &eng, &t("eve.json")]);
    ok(&["bundle", "export", "--data-dir", &op, "--out", &t("b1")]);
    assert!(ok(&["bundle", "import", "--data-dir", &eng, &t("b1")]).contains("fleet:"));
    assert!(ok(&["bundle", "import", "--data-dir", &eng, &t("b1")]).contains("nothing new"));

    let over = |v: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: SiteOverride\nmetadata: {{ name: a }}\nspec: {{ apps: {{ inspect: {{ version: {v} }} }} }}\n"
        )
    };
    let o1 = write(tmp.path(), "o1.yaml", &over("v2"));
    let o2 = write(tmp.path(), "o2.yaml", &over("v1-rollback"));
    ok(&["apply", "--data-dir", &op, "-f", &o1]);
    ok(&["apply", "--data-dir", &eng, "-f", &o2]);
    // The engineer may not touch the fleet document.
    let err = fails(&[
        "apply",
        "--data-dir",
        &eng,
        "-f",
        &write(tmp.path(), "x.yaml", &APP.replace("site: a }", "site: b }")),
    ]);
    assert!(err.contains("may not write fleet"), "{err}");

    ok(&[
        "bundle",
        "export",
        "--data-dir",
        &op,
        "--out",
        &t("from-op"),
    ]);
    ok(&[
        "bundle",
        "export",
        "--data-dir",
        &eng,
        "--out",
        &t("from-eng"),
    ]);
    ok(&["bundle", "import", "--data-dir", &eng, &t("from-op")]);
    ok(&["bundle", "import", "--data-dir", &op, &t("from-eng")]);
    let c_op = ok(&["get", "conflicts", "--data-dir", &op, "-o", "json"]);
    let c_eng = ok(&["get", "conflicts", "--data-dir", &eng, "-o", "json"]);
    assert_eq!(c_op, c_eng);
    let c: serde_json::Value = serde_json::from_str(&c_op).unwrap();
    assert_eq!(c[0]["field"], "apps.inspect.version");
    let writers: Vec<&str> = c[0]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["writer"].as_str().unwrap())
        .collect();
    assert!(
        writers.contains(&"admin") && writers.contains(&"eve"),
        "{writers:?}"
    );
    let table = ok(&["get", "conflicts", "--data-dir", &op]);
    assert!(
        table.contains("apps.inspect.version") && table.contains("yes") && table.contains("no"),
        "{table}"
    );

    // A tampered bundle is refused whole.
    let mut bytes = std::fs::read(t("from-op")).unwrap();
    let n = bytes.len();
    bytes[n - 70] ^= 0x01;
    std::fs::write(t("bad"), &bytes).unwrap();
    let err = fails(&["bundle", "import", "--data-dir", &eng, &t("bad")]);
    assert!(err.contains("bundle refused"), "{err}");
}

#[test]
fn kill_9_at_any_moment_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("op");
    let d = d.to_str().unwrap();
    ok(&["fleet", "init", "--data-dir", d]);
    // How long an apply takes here, now (a loaded machine is slower): the
    // kill delays sweep 0 to twice that, so some applies finish and some
    // are cut at every stage, whatever the machine's speed.
    let mut took = Vec::new();
    for j in 0..5 {
        let file = write(
            tmp.path(),
            &format!("w{j}.yaml"),
            &format!(
                "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{ name: w{j} }}\nspec: {{ data: {{ k: \"{j}\" }} }}\n"
            ),
        );
        let t = Instant::now();
        ok(&["apply", "--data-dir", d, "-f", &file]);
        took.push(t.elapsed());
    }
    took.sort();
    let whole = took[2].as_micros() as u64;
    let mut acknowledged = Vec::new();
    let mut killed = 0;
    for i in 0..40u64 {
        let file = write(
            tmp.path(),
            &format!("c{i}.yaml"),
            &format!(
                "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{ name: c{i} }}\nspec: {{ data: {{ k: \"{i}\" }} }}\n"
            ),
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["apply", "--data-dir", d, "-f", &file])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill after a delay that sweeps the process's whole life.
        let deadline = Instant::now() + Duration::from_micros((i * 7919) % 1000 * 2 * whole / 1000);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() >= deadline {
                child.kill().unwrap(); // SIGKILL
                killed += 1;
                child.wait().unwrap();
                break None;
            }
            std::thread::yield_now();
        };
        if status.is_some_and(|s| s.success()) {
            acknowledged.push(format!("c{i}"));
        }
    }
    let configs: serde_json::Value =
        serde_json::from_str(&ok(&["get", "configs", "--data-dir", d, "-o", "json"])).unwrap();
    for name in &acknowledged {
        assert!(configs.get(name).is_some(), "acknowledged {name} lost");
    }
    eprintln!(
        "an apply took {whole} µs (median of 5); killed {killed}, acknowledged {}",
        acknowledged.len()
    );
    assert!(
        killed > 0 && !acknowledged.is_empty(),
        "killed {killed}, acknowledged {}",
        acknowledged.len()
    );
    // The store is still fully usable.
    ok(&[
        "apply",
        "--data-dir",
        d,
        "-f",
        &write(tmp.path(), "last.yaml", APP),
    ]);
    ok(&[
        "bundle",
        "export",
        "--data-dir",
        d,
        "--out",
        tmp.path().join("b").to_str().unwrap(),
    ]);
}

#[test]
fn token_list_shows_a_hand_edited_entry_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    std::fs::write(
        dir.path().join("operators.json"),
        r#"[{"name": "alice", "sha256": "abc", "created_at": 1}, {"name": "bob", "sha256": "é€ü€é€ü€é€ü", "created_at": 2}]"#,
    )
    .unwrap();
    let out = ok(&["operator", "token", "list", "--data-dir", d]);
    assert!(out.contains("alice") && out.contains("abc"), "{out}");
    assert!(out.contains("bob"), "{out}");
    // Written before roles: they could do everything, and say so.
    assert!(
        out.lines()
            .filter(|l| l.contains("alice") || l.contains("bob"))
            .all(|l| l.contains("admin")),
        "{out}"
    );
}

#[test]
fn tokens_carry_a_role_and_a_site_engineer_a_site() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    std::fs::write(dir.path().join("root.key"), b"x").unwrap();
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "operator",
            "token",
            "create",
            "--data-dir",
            d,
            "--name",
            name,
        ];
        args.extend_from_slice(extra);
        shoal(&args)
    };
    assert!(create("vic", &["--role", "viewer"]).status.success());
    assert!(create("olga", &[]).status.success());
    assert!(
        create("carol", &["--role", "site-engineer", "--site", "north"])
            .status
            .success()
    );
    let no_site = create("dan", &["--role", "site-engineer"]);
    assert!(!no_site.status.success());
    assert!(String::from_utf8_lossy(&no_site.stderr).contains("--site"));
    let bad = create("eve", &["--role", "root"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("viewer, site-engineer, operator or admin")
    );
    let out = ok(&["operator", "token", "list", "--data-dir", d]);
    let row = |n: &str| {
        out.lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(row("vic"), "vic viewer -", "{out}");
    assert_eq!(row("olga"), "olga operator -", "{out}");
    assert_eq!(row("carol"), "carol site-engineer north", "{out}");
    assert!(!out.contains("dan") && !out.contains("eve"), "{out}");
}

#[test]
fn artifacts_are_declared_listed_and_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("op");
    let dir = d.to_str().unwrap();
    ok(&["fleet", "init", "--data-dir", dir, "--name", "f"]);
    let hash = "0f3a1d7c9e4b2a6f8d0c1e3b5a7f9d2c4e6a8b0d1f3e5c7a9b2d4f6e8a0c1e3b";
    let m = write(
        tmp.path(),
        "model.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: Artifact\nmetadata: {{ name: model-v3 }}\nspec: {{ size: 524288000, hash: {hash}, mediaType: application/onnx }}\n"
        ),
    );
    assert_eq!(
        ok(&["apply", "--data-dir", dir, "-f", &m]),
        "artifact/model-v3 configured (4 fields in fleet)\n"
    );
    let table = ok(&["get", "artifacts", "--data-dir", dir]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("model-v3") && table.contains("524.3 MB") && table.contains("0f3a1d7c9e4b"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["get", "artifacts", "--data-dir", dir, "-o", "json"])).unwrap();
    assert_eq!(json["model-v3"]["hash"], hash);
    assert_eq!(json["model-v3"]["size"], 524_288_000u64);
    ok(&["delete", "artifact", "model-v3", "--data-dir", dir]);
    assert!(!ok(&["get", "artifacts", "--data-dir", dir]).contains("model-v3"));
    let e = fails(&["delete", "artifact", "model-v3", "--data-dir", dir]);
    assert!(e.contains("Artifact model-v3"), "{e}");
}

/// An operator pushes a file; at the site, an engineer imports it from a
/// USB stick: the right file is taken, a wrong one refused with the hash
/// the fleet document names.
#[test]
fn an_artifact_is_pushed_and_carried_in_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let (op, eng) = (t("op"), t("eng"));
    ok(&["fleet", "init", "--data-dir", &op]);
    let model: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 1000) as u8).collect();
    std::fs::write(t("model.onnx"), &model).unwrap();
    let out = ok(&[
        "artifact",
        "push",
        "--data-dir",
        &op,
        &t("model.onnx"),
        "--name",
        "model-v3",
        "--media-type",
        "application/onnx",
    ]);
    let hash = blobs::Hash::of(&model).to_string();
    assert!(out.contains("artifact/model-v3 configured"), "{out}");
    assert!(out.contains(&hash), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["get", "artifacts", "--data-dir", &op, "-o", "json"])).unwrap();
    assert_eq!(json["model-v3"]["hash"], hash);
    assert_eq!(json["model-v3"]["size"], model.len());
    // The blob is in the data dir's store, read-only.
    let blob = tmp.path().join("op/blobs").join(&hash);
    assert_eq!(std::fs::read(&blob).unwrap(), model);

    // The site: an engineer's data dir that has synced the fleet document.
    ok(&[
        "identity",
        "create",
        "--data-dir",
        &op,
        "--role",
        "site-engineer",
        "--site",
        "a",
        "--name",
        "eve",
        "--out",
        &t("eve.json"),
    ]);
    ok(&["identity", "use", "--data-dir", &eng, &t("eve.json")]);
    ok(&["bundle", "export", "--data-dir", &op, "--out", &t("b1")]);
    ok(&["bundle", "import", "--data-dir", &eng, &t("b1")]);
    let mut wrong = model.clone();
    wrong[150_000] ^= 1;
    std::fs::write(t("usb.onnx"), &wrong).unwrap();
    let e = fails(&[
        "artifact",
        "import",
        "--data-dir",
        &eng,
        &t("usb.onnx"),
        "--name",
        "model-v3",
    ]);
    assert!(e.contains(&format!("expected {hash}")), "{e}");
    assert!(!tmp.path().join("eng/blobs").join(&hash).exists());
    std::fs::write(t("usb.onnx"), &model).unwrap();
    let out = ok(&[
        "artifact",
        "import",
        "--data-dir",
        &eng,
        &t("usb.onnx"),
        "--name",
        "model-v3",
    ]);
    assert!(out.contains("verified"), "{out}");
    assert_eq!(
        std::fs::read(tmp.path().join("eng/blobs").join(&hash)).unwrap(),
        model
    );
    let e = fails(&[
        "artifact",
        "import",
        "--data-dir",
        &eng,
        &t("usb.onnx"),
        "--name",
        "nope",
    ]);
    assert!(e.contains("no artifact \"nope\""), "{e}");
}
