//! The operator web UI in a real headless Chromium (Debian's `chromium`),
//! served by a real anchor with a real node: log in, watch a node go
//! offline and come back without a reload, edit an app (a validation error
//! next to its field, then a good edit), resolve a conflict with one click,
//! upload an artifact, and pause, resume and abort a rollout.
//! Without Chromium this test fails, saying to install it.
//!
//! `SHOAL_SCREENSHOTS=DIR` keeps screenshots of the main pages there
//! (`docs/screenshots/` holds the ones made this way).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/cdp.rs"]
mod cdp;
mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::*;

const UI_WITHIN: Duration = Duration::from_secs(30);

fn shot(b: &mut cdp::Browser, name: &str) {
    if let Ok(dir) = std::env::var("SHOAL_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        b.screenshot(&Path::new(&dir).join(format!("{name}.png")))
            .unwrap();
    }
}

/// Fills the login form, once it is shown, with `token` and sends it.
fn log_in(b: &mut cdp::Browser, token: &str) {
    wait(b, "!!document.querySelector('#token')");
    b.fill("#token", token).unwrap();
    b.click("#login-form button").unwrap();
}

fn wait(b: &mut cdp::Browser, cond: &str) {
    if let Err(e) = b.wait_until(cond, UI_WITHIN) {
        let html = b
            .eval("document.querySelector('main').innerText")
            .unwrap_or_default();
        panic!("{e}\npage: {html}\nerrors: {:?}", b.errors());
    }
}

fn go(b: &mut cdp::Browser, hash: &str) {
    b.eval(&format!("location.hash = {}", json!(hash))).unwrap();
}

/// An anchor on loopback serving its API and UI over plain HTTP.
fn plain_anchor(dir: &Path) -> Daemon {
    Daemon::start(
        "anchor",
        dir,
        &[
            "--listen".into(),
            format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_udp_port()),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--insecure-http".into(),
        ],
        None,
    )
}

#[test]
fn operator_ui_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    fleet_init(&anchor_dir, "plant");
    let token = operator_token(&anchor_dir, "alice");
    let n1 = bundle_node(&anchor_dir, root, "n1", "s1");
    // A second operator, working offline on her own copy (for a conflict).
    let bob = root.join("bob.json");
    ok(&[
        "identity",
        "create",
        "--data-dir",
        s(&anchor_dir),
        "--role",
        "operator",
        "--name",
        "bob",
        "--out",
        s(&bob),
    ]);
    let bob_dir = root.join("bob");
    ok(&["identity", "use", "--data-dir", s(&bob_dir), s(&bob)]);
    let snapshot = root.join("fleet.bundle");
    ok(&[
        "bundle",
        "export",
        "--data-dir",
        s(&anchor_dir),
        "--out",
        s(&snapshot),
    ]);
    ok(&["bundle", "import", "--data-dir", s(&bob_dir), s(&snapshot)]);

    let anchor = plain_anchor(&anchor_dir);
    let url = http_url(&anchor_dir);
    let node_args = vec![
        "--listen".to_string(),
        "/ip4/127.0.0.1/udp/0/quic-v1".into(),
        "--peer".into(),
        anchor.addr_on("127.0.0.1"),
    ];
    let mut node = Daemon::start("node", &n1, &node_args, None);
    let web = json!({ "files": [{ "name": "web.yaml", "text": app_yaml("web", "v1") }] });
    assert_eq!(
        http(
            "POST",
            &format!("{url}/api/apply"),
            Some(&token),
            Some(&web.to_string())
        )
        .0,
        200
    );
    // Concurrent edits of one field: alice through the API, bob offline.
    let cfg = |who: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{name: greeting}}\nspec:\n  data: {{message: \"from {who}\"}}\n"
        )
    };
    let body = json!({ "files": [{ "name": "greeting.yaml", "text": cfg("alice") }] });
    assert_eq!(
        http(
            "POST",
            &format!("{url}/api/apply"),
            Some(&token),
            Some(&body.to_string())
        )
        .0,
        200
    );
    let f = write(root, "greeting.yaml", &cfg("bob"));
    ok(&["apply", "--data-dir", s(&bob_dir), "-f", s(&f)]);
    let bob_bundle = root.join("bob.bundle");
    ok(&[
        "bundle",
        "export",
        "--data-dir",
        s(&bob_dir),
        "--out",
        s(&bob_bundle),
    ]);
    ok(&[
        "bundle",
        "import",
        "--data-dir",
        s(&anchor_dir),
        s(&bob_bundle),
    ]);
    assert!(
        wait_for(UI_WITHIN, || api_get(
            &format!("{url}/api/conflicts"),
            &token
        )["items"]
            .as_array()
            .is_some_and(|a| !a.is_empty())),
        "no conflict to resolve"
    );

    let mut b = cdp::Browser::launch(1280, 860).unwrap_or_else(|e| {
        panic!("cannot start headless Chromium: {e} (install chromium: `apt-get install chromium`)")
    });
    // Log in with the token.
    b.navigate(&format!("{url}/")).unwrap();
    log_in(&mut b, "shoal-op-wrong");
    wait(&mut b, "!!document.querySelector('#login-error')");
    log_in(&mut b, &token);
    wait(
        &mut b,
        "document.querySelector('#total-nodes')?.textContent === '1'",
    );
    // Served with --insecure-http: every page says so.
    wait(
        &mut b,
        "document.querySelector('#insecure')?.hidden === false",
    );
    wait(
        &mut b,
        "document.querySelector('#total-connected')?.textContent === '1'",
    );
    wait(
        &mut b,
        "document.querySelector('#live')?.classList.contains('on')",
    );
    shot(&mut b, "overview");

    // A node goes offline and comes back: the row changes without a reload.
    go(&mut b, "#/nodes");
    let row = "document.querySelector('tr[data-node=\"n1\"]')?.dataset.state";
    wait(&mut b, &format!("{row} === 'ok'"));
    b.eval("window.__same_page = true").unwrap();
    node.stop();
    wait(&mut b, &format!("{row} === 'offline'"));
    shot(&mut b, "nodes-offline");
    let _node = Daemon::start("node", &n1, &node_args, None);
    wait(&mut b, &format!("{row} === 'ok'"));
    assert_eq!(
        b.eval("window.__same_page === true").unwrap(),
        json!(true),
        "the page was reloaded"
    );
    go(&mut b, "#/node/n1");
    wait(
        &mut b,
        "document.querySelector('#workloads')?.innerText.includes('running')",
    );
    shot(&mut b, "node");

    // Edit an app: a validation error next to its field, then a good edit.
    go(&mut b, "#/app/web");
    wait(
        &mut b,
        "(document.querySelector('#yaml')?.value || '').includes('kind: App')",
    );
    let text: String = b
        .eval("document.querySelector('#yaml').value")
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let bad = text.replace("version: v1", "replicas: lots");
    assert_ne!(bad, text, "the editor's YAML: {text}");
    b.fill("#yaml", &bad).unwrap();
    b.click("#save").unwrap();
    wait(
        &mut b,
        "(document.querySelector('#validation-error')?.innerText || '').includes('spec.replicas')",
    );
    wait(&mut b, "!!document.querySelector('#bad-line')");
    let line = b
        .eval("document.querySelector('#bad-line').textContent")
        .unwrap();
    let expect = bad
        .lines()
        .position(|l| l.contains("replicas: lots"))
        .unwrap()
        + 1;
    assert_eq!(
        line,
        json!(expect.to_string()),
        "the error marks the field's line"
    );
    shot(&mut b, "app-validation-error");
    assert_eq!(
        api_get(&format!("{url}/api/apps/web"), &token)["spec"]["version"],
        "v1",
        "nothing applied"
    );
    b.fill("#yaml", &text.replace("version: v1", "version: v2"))
        .unwrap();
    b.click("#save").unwrap();
    wait(&mut b, "!!document.querySelector('#applied')");
    assert_eq!(
        api_get(&format!("{url}/api/apps/web"), &token)["spec"]["version"],
        "v2"
    );

    // Resolve the conflict with one click.
    go(&mut b, "#/conflicts");
    wait(&mut b, "!!document.querySelector('.conflict button.keep')");
    let shown = b
        .eval("document.querySelector('.conflict').innerText")
        .unwrap();
    assert!(shown.as_str().unwrap().contains("from bob"), "{shown}");
    assert!(shown.as_str().unwrap().contains("from alice"), "{shown}");
    assert!(
        shown
            .as_str()
            .unwrap()
            .contains("alice through the anchor API"),
        "who asked for the anchor-signed value: {shown}"
    );
    shot(&mut b, "conflicts");
    b.click(".conflict button.keep").unwrap();
    wait(&mut b, "!!document.querySelector('#no-conflicts')");
    assert_eq!(
        api_get(&format!("{url}/api/conflicts"), &token)["items"],
        json!([])
    );

    go(&mut b, "#/timeline");
    wait(
        &mut b,
        "(document.querySelector('main')?.innerText || '').includes('resolved')",
    );
    shot(&mut b, "timeline");

    // An artifact uploaded in the browser; the node's app names it, and
    // the page shows the node holding it whole and from whom.
    go(&mut b, "#/artifacts");
    wait(&mut b, "!!document.querySelector('#upload')");
    let model: String = (0..100_000u32)
        .map(|i| char::from(b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26))
        .collect();
    b.eval(&format!(
        "(() => {{ const dt = new DataTransfer(); dt.items.add(new File([{}], 'model.bin')); document.querySelector('#up-file').files = dt.files; }})()",
        json!(model)
    ))
    .unwrap();
    b.fill("#up-name", "model-v1").unwrap();
    b.click("#upload button").unwrap();
    wait(&mut b, "!!document.querySelector('#uploaded')");
    let hash = blobs::Hash::of(model.as_bytes()).to_string();
    assert_eq!(
        std::fs::read(anchor_dir.join("blobs").join(&hash)).unwrap(),
        model.as_bytes()
    );
    let file = write(root, "model.bin", &model);
    let reader = json!({ "files": [{ "name": "r.yaml", "text": format!(
        "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: reader}}\nspec:\n  native:\n    command: [/bin/sh, -c, 'cmp \"$SHOAL_ARTIFACT_M\" {} && echo SAME; exec sleep 3600']\n  artifacts: {{m: model-v1}}\n",
        file.display()
    ) }] });
    assert_eq!(
        http(
            "POST",
            &format!("{url}/api/apply"),
            Some(&token),
            Some(&reader.to_string())
        )
        .0,
        200
    );
    go(&mut b, "#/overview");
    go(&mut b, "#/artifacts");
    wait(
        &mut b,
        "(document.querySelector('tr[data-artifact=\"model-v1\"] .held[data-node=\"n1\"]')?.innerText || '').includes('whole')",
    );
    let row = b
        .eval("document.querySelector('tr[data-artifact=\"model-v1\"]').innerText")
        .unwrap();
    assert!(row.as_str().unwrap().contains("from anchor"), "{row}");
    shot(&mut b, "artifacts");

    // A rollout: its waves as the anchor judges them, then pause, resume
    // and abort from the page (each a signed change naming alice).
    let meter = |v: &str| {
        json!({ "files": [{ "name": "meter.yaml", "text": format!(
            "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: meter}}\nspec:\n  version: {v}\n  native: {{command: [/bin/sh, -c, 'exec sleep 3600', meter-{v}]}}\n  rollout: {{waves: [{{sites: [s1]}}, {{percent: 100}}], healthy_for_s: 600}}\n"
        ) }] })
        .to_string()
    };
    for v in ["v1", "v2"] {
        let (status, body) = http(
            "POST",
            &format!("{url}/api/apply"),
            Some(&token),
            Some(&meter(v)),
        );
        assert_eq!(status, 200, "{body}");
    }
    go(&mut b, "#/rollouts");
    let section = "document.querySelector('section.rollout[data-app=\"meter\"]')";
    wait(
        &mut b,
        &format!(
            "{section}?.dataset.phase === 'rolling' && {section}.querySelector('tr[data-wave=\"0\"]').cells[3].innerText === '1'"
        ),
    );
    let text = b.eval(&format!("{section}.innerText")).unwrap();
    assert!(text.as_str().unwrap().contains("v2"), "{text}");
    shot(&mut b, "rollouts");
    let click = |b: &mut cdp::Browser, action: &str| {
        b.eval(&format!(
            "{section}.querySelector('button[data-action=\"{action}\"]').click()"
        ))
        .unwrap();
    };
    click(&mut b, "pause");
    wait(&mut b, &format!("{section}?.dataset.phase === 'paused'"));
    click(&mut b, "resume");
    wait(&mut b, &format!("{section}?.dataset.phase === 'rolling'"));
    b.eval("window.confirm = () => true").unwrap();
    click(&mut b, "abort");
    wait(&mut b, &format!("{section}?.dataset.phase === 'aborted'"));
    let decisions = b
        .eval(&format!(
            "{section}.querySelector('table.decisions').innerText"
        ))
        .unwrap();
    assert!(
        decisions.as_str().unwrap().contains("abort by alice"),
        "{decisions}"
    );

    // A viewer reads, and an edit is refused with the role it needs.
    let viewer = support::token_with_role(&anchor_dir, "vic", "viewer");
    let before = api_get(&format!("{url}/api/apps/web"), &token)["spec"].clone();
    assert!(before["version"].is_string(), "{before}");
    b.click("#logout").unwrap();
    log_in(&mut b, &viewer);
    wait(
        &mut b,
        "(document.querySelector('#role')?.textContent || '').includes('viewer')",
    );
    go(&mut b, "#/app/web");
    wait(&mut b, "!!document.querySelector('#save')");
    b.click("#save").unwrap();
    wait(
        &mut b,
        "(document.querySelector('#validation-error')?.innerText || '').includes('needs the site-engineer role')",
    );
    shot(&mut b, "viewer-refused");
    assert_eq!(
        api_get(&format!("{url}/api/apps/web"), &token)["spec"],
        before,
        "the viewer's edit changed nothing"
    );
    assert!(b.errors().is_empty(), "page errors: {:?}", b.errors());
}

/// Over HTTPS with a certificate from the fleet's TLS CA (Chromium told to
/// accept exactly that certificate's key, as a browser that imported
/// `tls-ca.pem` would), the UI logs in and shows no plain-HTTP warning.
#[test]
fn the_ui_over_https_has_no_plain_http_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&dir), "--name", "f"]);
    let token = operator_token(&dir, "alice");
    let tls = root.join("tls");
    let pin = fleet_tls_cert(&dir, &["127.0.0.1"], &tls);
    let _anchor = Daemon::start(
        "anchor",
        &dir,
        &[
            "--listen".into(),
            format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_udp_port()),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--tls-cert".into(),
            s(&tls.join("tls.pem")).into(),
            "--tls-key".into(),
            s(&tls.join("tls.key")).into(),
        ],
        None,
    );
    let url = http_url(&dir).replace("http://", "https://");
    let mut b = cdp::Browser::launch_with(
        1280,
        860,
        &[format!("--ignore-certificate-errors-spki-list={pin}")],
    )
    .unwrap_or_else(|e| {
        panic!("cannot start headless Chromium: {e} (install chromium: `apt-get install chromium`)")
    });
    b.navigate(&format!("{url}/")).unwrap();
    log_in(&mut b, &token);
    wait(
        &mut b,
        "location.protocol === 'https:' && (document.querySelector('#who')?.textContent || '').includes('alice')",
    );
    assert_eq!(
        b.eval("document.querySelector('#insecure').hidden")
            .unwrap(),
        json!(true),
        "no plain-HTTP warning over HTTPS"
    );
}

/// The text of the first element matching `sel`.
fn text_of(b: &mut cdp::Browser, sel: &str) -> String {
    b.eval(&format!(
        "document.querySelector({})?.innerText ?? ''",
        json!(sel)
    ))
    .unwrap()
    .as_str()
    .unwrap_or_default()
    .to_string()
}

/// Puts `yaml` in the editor and sends it; waits for the signing dialog,
/// whose text is returned, and signs.
fn sign_in_editor(b: &mut cdp::Browser, yaml: &str) -> String {
    wait(b, "!!document.querySelector('#yaml')");
    b.fill("#yaml", yaml).unwrap();
    b.click("#save").unwrap();
    wait(b, "!!document.querySelector('#sign-confirm')");
    let shown = text_of(b, "#sign-dialog");
    shot(b, "sign-dialog");
    b.click("#sign-confirm").unwrap();
    wait(
        b,
        "document.querySelector('#applied')?.innerText.includes('Signed by')",
    );
    shown
}

/// Logs out (the cookie goes) and in again with `token`.
fn log_in_as(b: &mut cdp::Browser, token: &str, name: &str) {
    if b.eval("!!document.querySelector('#logout')").unwrap() == json!(true) {
        b.click("#logout").unwrap();
    }
    log_in(b, token);
    wait(
        b,
        &format!(
            "document.querySelector('#who')?.innerText.includes({})",
            json!(name)
        ),
    );
}

/// Enrolls a browser key for the logged-in user with an invitation `code`,
/// has the admin approve it with the fleet root (`op`, the operator's data
/// dir) after checking the fingerprint the page shows, and waits until the
/// page says the key is certified. A wrong fingerprint is not approved.
fn enroll_browser_key(
    b: &mut cdp::Browser,
    url: &str,
    admin: &str,
    op: &Path,
    name: &str,
    code: &str,
) {
    go(b, "#/keys");
    wait(b, "!!document.querySelector('#enroll-code')");
    b.fill("#enroll-code", code).unwrap();
    b.click("#enroll").unwrap();
    wait(
        b,
        "document.querySelector('#key-state')?.dataset.state === 'pending'",
    );
    let fp = text_of(b, "#key-fingerprint");
    assert_eq!(fp.len(), 29, "six groups of four hex digits: {fp:?}");
    let approve = |fingerprint: &str| {
        shoal(&[
            "identity",
            "approve",
            "--data-dir",
            s(op),
            "--anchor",
            url,
            "--token",
            admin,
            "--name",
            name,
            "--fingerprint",
            fingerprint,
        ])
    };
    let wrong = approve("0123 4567 89ab cdef");
    assert!(
        !wrong.status.success(),
        "a key with another fingerprint was approved"
    );
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("do not approve"), "{err}");
    let out = approve(&fp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait(
        b,
        "document.querySelector('#key-state')?.dataset.state === 'certified'",
    );
}

/// The latest change of `doc` a node holds, as `shoal get changes` on its
/// data dir shows it (writer and role from the certificates alone).
fn latest_change(dir: &Path, doc: &str) -> serde_json::Value {
    get(dir, "changes")
        .as_array()
        .and_then(|a| a.iter().rev().find(|c| c["doc"] == doc).cloned())
        .unwrap_or_default()
}

/// On an anchor that holds neither the fleet root nor an operator identity
/// (migrated, ADR 0013), operators sign their edits in Chromium with keys
/// their browsers made and cannot export (ADR 0015): alice enrolls hers
/// with an invitation code, the admin approves it with the root after
/// checking the fingerprint, and her edit reaches the node as alice's
/// change. A viewer's edit is refused by the anchor (403, shown); a site
/// engineer signs their own site's overrides and is refused another site's.
#[test]
fn operators_sign_their_edits_in_the_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    fleet_init(&anchor_dir, "plant");
    let n1 = bundle_node(&anchor_dir, root, "n1", "north");
    let op = root.join("op");
    ok(&[
        "fleet",
        "migrate",
        "--data-dir",
        s(&anchor_dir),
        "--out",
        s(&op),
    ]);
    let admin = token_with_role(&anchor_dir, "root-admin", "admin");
    let alice_token = token_with_role(&anchor_dir, "alice", "operator");
    let viewer_token = token_with_role(&anchor_dir, "vic", "viewer");
    let bob_token = ok(&[
        "operator",
        "token",
        "create",
        "--data-dir",
        s(&anchor_dir),
        "--name",
        "bob",
        "--role",
        "site-engineer",
        "--site",
        "north",
    ])
    .trim()
    .to_string();
    let anchor = plain_anchor(&anchor_dir);
    let url = http_url(&anchor_dir);
    let anchor_addr = anchor.addr_on("127.0.0.1");
    let _node = Daemon::start(
        "node",
        &n1,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            anchor_addr,
        ],
        None,
    );
    // A config to edit, signed by the admin's operator identity on their
    // own machine (the anchor signs nothing).
    let cfg = |msg: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{name: greeting}}\nspec:\n  data: {{message: \"{msg}\"}}\n"
        )
    };
    let f = write(root, "greeting.yaml", &cfg("from the admin"));
    apply_signed(&url, &admin, &op.join("identity.json"), &f);

    let code = ok(&[
        "identity", "invite", "--anchor", &url, "--token", &admin, "--name", "alice", "--role",
        "operator",
    ])
    .trim()
    .to_string();
    assert!(code.starts_with("shoal-key-"), "{code}");

    let mut b = cdp::Browser::launch(1280, 900).unwrap_or_else(|e| {
        panic!("cannot start headless Chromium: {e} (install chromium: `apt-get install chromium`)")
    });
    b.navigate(&format!("{url}/")).unwrap();
    log_in_as(&mut b, &alice_token, "alice");
    // Without a key, this anchor makes no edit for her.
    go(&mut b, "#/config/greeting");
    wait(
        &mut b,
        "document.querySelector('#yaml')?.value.includes('from the admin')",
    );
    b.click("#save").unwrap();
    wait(
        &mut b,
        "document.querySelector('#validation-error')?.innerText.includes('enroll your browser')",
    );

    enroll_browser_key(&mut b, &url, &admin, &op, "alice", &code);
    shot(&mut b, "keys");
    // The code was for one key: another key with it is refused.
    let (status, _) = http(
        "POST",
        &format!("{url}/api/keys/enroll"),
        Some(&alice_token),
        Some(&json!({ "code": code, "key": "ab".repeat(32) }).to_string()),
    );
    assert_eq!(status, 409);
    // The private key cannot leave the browser.
    let kept = b
        .eval(
            "(async () => { const r = await loadKey(); \
             try { await crypto.subtle.exportKey('pkcs8', r.privateKey); return 'exported'; } \
             catch (e) { return r.privateKey.extractable === false ? 'kept' : 'extractable'; } })()",
        )
        .unwrap();
    assert_eq!(kept, json!("kept"));

    // The page signs only a change that writes what it shows: one that
    // says otherwise, or is made for another key, is refused before any
    // signature.
    let checked = b
        .eval(&format!(
            "(async () => {{ const rec = await loadKey(); \
             const p = await api('POST', `/api/prepare?key=${{rec.key}}`, {}); \
             const A = await loadAutomerge(); const e = p.edits[0]; const bytes = unb64(e.change); \
             const seen = checkChange(A, bytes, e, rec.key).ops.length; \
             const lie = {{ ...e, ops: {{ ...e.ops, [Object.keys(e.ops)[0]]: '\"else\"' }} }}; \
             const more = {{ ...e, ops: {{ ...e.ops, 'configs.extra': '1' }} }}; \
             const why = (f) => {{ try {{ f(); return ''; }} catch (x) {{ return x.message; }} }}; \
             return [seen, why(() => checkChange(A, bytes, lie, rec.key)), \
               why(() => checkChange(A, bytes, more, rec.key)), \
               why(() => checkChange(A, bytes, e, '00'.repeat(32)))]; }})()",
            json!({ "apply": { "files": [{ "name": "g", "text": cfg("checked") }] } })
        ))
        .unwrap();
    assert_eq!(checked[0], 1, "{checked}");
    assert!(
        checked[1]
            .as_str()
            .unwrap()
            .contains("otherwise than shown"),
        "{checked}"
    );
    assert!(
        checked[2]
            .as_str()
            .unwrap()
            .contains("leaves out configs.extra"),
        "{checked}"
    );
    assert!(
        checked[3]
            .as_str()
            .unwrap()
            .contains("not made for this browser's key"),
        "{checked}"
    );

    go(&mut b, "#/config/greeting");
    let shown = sign_in_editor(&mut b, &cfg("from alice's browser"));
    assert!(
        shown.contains("configs.greeting") && shown.contains("from alice's browser"),
        "the dialog shows what is signed: {shown}"
    );
    assert!(shown.contains("from the admin"), "and what it was: {shown}");
    shot(&mut b, "signed-edit");
    assert!(
        wait_for(UI_WITHIN, || {
            let c = latest_change(&n1, "fleet");
            c["writer"] == "alice" && c["role"] == "operator"
        }),
        "n1 never held alice's change: {}",
        latest_change(&n1, "fleet")
    );
    assert!(
        latest_change(&n1, "fleet").get("message").is_none(),
        "no service signed it"
    );
    let configs = get(&n1, "configs").to_string();
    assert!(configs.contains("from alice's browser"), "{configs}");

    // The admin, on the root's machine, edits the same field on a copy
    // that never saw alice's change: a conflict, which names both signers;
    // alice keeps her value with one click, signed in her browser.
    let stale = write(root, "stale.yaml", &cfg("from the root machine"));
    ok(&["apply", "--data-dir", s(&op), "-f", s(&stale)]);
    let bundle = root.join("op.bundle");
    ok(&[
        "bundle",
        "export",
        "--data-dir",
        s(&op),
        "--out",
        s(&bundle),
    ]);
    cloud_anchor::client::Client::new(&url, &admin)
        .post_changes(std::fs::read(&bundle).unwrap())
        .unwrap();
    go(&mut b, "#/conflicts");
    let conflict =
        "document.querySelector('.conflict[data-field=\"configs.greeting.data.message\"]')";
    wait(
        &mut b,
        &format!("{conflict}?.innerText.includes('from the root machine')"),
    );
    let writers = text_of(&mut b, ".conflict");
    assert!(
        writers.contains("alice") && writers.contains("admin"),
        "the conflict names each value's signer: {writers}"
    );
    b.eval(&format!(
        "[...{conflict}.querySelectorAll('tr')].find((tr) => tr.innerText.includes(\"alice's browser\")).querySelector('button.keep').click()"
    ))
    .unwrap();
    wait(
        &mut b,
        "document.querySelector('#sign-confirm') || document.querySelector('#resolve-error')",
    );
    assert_eq!(text_of(&mut b, "#resolve-error"), "", "keeping a value");
    b.click("#sign-confirm").unwrap();
    wait(&mut b, "!!document.querySelector('#no-conflicts')");
    let conflicts = get(&n1, "conflicts").to_string();
    assert!(
        wait_for(UI_WITHIN, || get(&n1, "conflicts")
            .as_array()
            .is_some_and(|a| a.is_empty())),
        "n1 still holds the conflict: {conflicts}"
    );
    assert_eq!(latest_change(&n1, "fleet")["writer"], "alice");

    // A viewer may not edit: the anchor refuses (403) and the page says so.
    log_in_as(&mut b, &viewer_token, "vic");
    go(&mut b, "#/config/greeting");
    wait(
        &mut b,
        "document.querySelector('#yaml')?.value.includes('alice')",
    );
    b.click("#save").unwrap();
    wait(
        &mut b,
        "document.querySelector('#validation-error')?.innerText.includes('needs the site-engineer role')",
    );
    let (status, _) = http(
        "POST",
        &format!("{url}/api/prepare"),
        Some(&viewer_token),
        Some(&json!({ "apply": { "files": [{ "name": "g", "text": cfg("x") }] } }).to_string()),
    );
    assert_eq!(status, 403);

    // A site engineer signs their own site's overrides, not another's.
    let code = ok(&[
        "identity",
        "invite",
        "--anchor",
        &url,
        "--token",
        &admin,
        "--name",
        "bob",
        "--role",
        "site-engineer",
        "--site",
        "north",
    ])
    .trim()
    .to_string();
    log_in_as(&mut b, &bob_token, "bob");
    enroll_browser_key(&mut b, &url, &admin, &op, "bob", &code);
    let site = |name: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: SiteOverride\nmetadata: {{name: {name}}}\nspec:\n  configs: {{greeting: {{data: {{message: \"from bob at {name}\"}}}}}}\n"
        )
    };
    go(&mut b, "#/config/new");
    let shown = sign_in_editor(&mut b, &site("north"));
    assert!(shown.contains("site/north"), "{shown}");
    assert!(
        wait_for(UI_WITHIN, || {
            let c = latest_change(&n1, "site/north");
            c["writer"] == "bob" && c["role"] == "site-engineer"
        }),
        "n1 never held bob's change: {}",
        latest_change(&n1, "site/north")
    );
    // Another hash: a fresh editor.
    go(&mut b, "#/config/new?again");
    wait(
        &mut b,
        "location.hash.endsWith('again') && document.querySelector('#yaml')?.value.includes('my-config')",
    );
    b.fill("#yaml", &site("south")).unwrap();
    b.click("#save").unwrap();
    wait(
        &mut b,
        "document.querySelector('#validation-error')?.innerText.includes('applies only SiteOverride north')",
    );
    assert!(
        b.eval("!document.querySelector('#sign-dialog')").unwrap() == json!(true),
        "nothing offered to sign"
    );
    assert!(b.errors().is_empty(), "page errors: {:?}", b.errors());

    // The audit trail holds each invitation, key and certificate, by whom.
    let timeline = api_get(&format!("{url}/api/timeline?per_page=500"), &admin);
    let seen = |kind: &str, words: &str| {
        timeline["items"].as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e["kind"] == kind && e["text"].as_str().is_some_and(|t| t.contains(words)))
        })
    };
    for (kind, words) in [
        ("invited", "root-admin invited alice (operator)"),
        ("invited", "root-admin invited bob (site-engineer of north)"),
        ("key-requested", "for alice's invitation"),
        ("certified", "browser key of alice (operator) certified"),
        (
            "certified",
            "browser key of bob (site-engineer of north) certified",
        ),
    ] {
        assert!(
            seen(kind, words),
            "no {kind} entry with {words:?}: {timeline}"
        );
    }
}
