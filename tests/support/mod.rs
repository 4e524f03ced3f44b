//! Real-process harness: `shoal` daemons as child processes, CLI calls,
//! and waiting for conditions with deadlines.
#![allow(dead_code)]

#[path = "../../node/tests/support/poll.rs"]
mod poll_impl;
#[allow(unused_imports)]
pub use poll_impl::poll;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `shoal` binary: Cargo names it for tests; an example (the bench)
/// finds it beside itself (`target/<profile>/shoal`).
pub fn bin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_shoal") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.parent()?.join("shoal")))
            .unwrap_or_else(|| PathBuf::from("shoal")),
    }
}

pub fn shoal(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("SHOAL_LOG", "warn")
        .output()
        .expect("run shoal")
}

/// Runs shoal and returns stdout; panics with stderr on failure.
pub fn ok(args: &[&str]) -> String {
    let out = shoal(args);
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `shoal get WHAT -o json` on a data dir, parsed; `Null` if the call fails.
pub fn get(dir: &Path, what: &str) -> serde_json::Value {
    let out = shoal(&["get", what, "--data-dir", s(dir), "-o", "json"]);
    if !out.status.success() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Polls `cond` every 100 ms until it holds or `within` passes.
pub fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A daemon child process; killed (SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `shoal <kind> run --data-dir DIR ARGS...` (kind: anchor|node),
    /// optionally inside a network namespace, and waits for it to listen.
    pub fn start(kind: &str, dir: &Path, args: &[String], netns: Option<&str>) -> Daemon {
        Daemon::start_with_log(kind, dir, args, netns, None)
    }

    /// As [`Daemon::start`], with its own log filter (`SHOAL_LOG`).
    pub fn start_with_log(
        kind: &str,
        dir: &Path,
        args: &[String],
        netns: Option<&str>,
        filter: Option<&str>,
    ) -> Daemon {
        let log = dir.with_extension(format!(
            "{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let _ = std::fs::remove_file(dir.join("addrs.json"));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.args([kind, "run", "--data-dir", s(dir)])
            .args(args)
            .env(
                "SHOAL_LOG",
                filter.map(str::to_string).unwrap_or_else(|| {
                    std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "info,libp2p=warn".into())
                }),
            )
            // Both in append mode: with its own offset, stdout would write
            // over what stderr appended (the daemon's few `say!` lines
            // clobbered the start of its log).
            .stdout(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            ))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ));
        let child = cmd.spawn().expect("spawn daemon");
        let d = Daemon {
            child,
            dir: dir.to_path_buf(),
            log,
        };
        assert!(
            wait_for(Duration::from_secs(20), || !d.addrs().is_empty()
                && dir.join("control.sock").exists()),
            "{kind} in {} did not start: {}",
            dir.display(),
            d.log_text()
        );
        d
    }

    /// The addresses it listens on (each ending in /p2p/<id>).
    pub fn addrs(&self) -> Vec<String> {
        std::fs::read(self.dir.join("addrs.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Its first address on `ip` (e.g. "127.0.0.1").
    pub fn addr_on(&self, ip: &str) -> String {
        self.addrs()
            .into_iter()
            .find(|a| a.starts_with(&format!("/ip4/{ip}/")))
            .unwrap_or_else(|| panic!("no address on {ip}: {:?}", self.addrs()))
    }

    pub fn peer_id(&self) -> String {
        let a = self.addrs().into_iter().next().expect("an address");
        a.rsplit('/').next().unwrap().to_string()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("daemon did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    /// SIGTERM first, so a node stops the apps it runs (they live in
    /// process groups of their own and would outlive a SIGKILL), then
    /// SIGKILL whatever is left after 5 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

/// A UDP port free right now on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn app_yaml(name: &str, version: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: {name}}}\nspec:\n  version: \"{version}\"\n  native: {{command: [/bin/sleep, \"3600\"]}}\n"
    )
}

pub fn site_yaml(site: &str, app: &str, version: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: SiteOverride\nmetadata: {{name: {site}}}\nspec:\n  apps:\n    {app}: {{version: \"{version}\"}}\n"
    )
}

/// The version a site overrides for an app, as `get sites` shows it.
pub fn site_version(dir: &Path, site: &str, app: &str) -> Option<String> {
    get(dir, "sites")
        .get(site)?
        .get("apps")?
        .get(app)?
        .get("version")?
        .as_str()
        .map(String::from)
}

pub fn app_version(dir: &Path, app: &str) -> Option<String> {
    get(dir, "apps")
        .get(app)?
        .get("version")?
        .as_str()
        .map(String::from)
}

/// `shoal apply` of one file on `dir`, signed with the identity file `who`.
pub fn apply_as(dir: &Path, who: &Path, file: &Path) -> String {
    ok(&[
        "apply",
        "--data-dir",
        s(dir),
        "--identity",
        s(who),
        "-f",
        s(file),
    ])
}

/// `shoal fleet tls-cert` on the data dir where the root is, for `names`,
/// into `out` (tls.pem, tls.key, tls-ca.pem); the pin it prints (base64 of
/// the SHA-256 of the leaf's public key).
#[allow(dead_code)]
pub fn fleet_tls_cert(root_dir: &Path, names: &[&str], out: &Path) -> String {
    let mut args = vec![
        "fleet",
        "tls-cert",
        "--data-dir",
        s(root_dir),
        "--out-dir",
        s(out),
    ];
    for n in names {
        args.extend(["--name", n]);
    }
    let said = ok(&args);
    said.lines()
        .find_map(|l| l.strip_prefix("pin: sha256//"))
        .unwrap_or_else(|| panic!("no pin in {said}"))
        .to_string()
}

/// Issues an operator identity `name` on the data dir where the root is,
/// written to `out` (from then on it lives on the operator's machine).
#[allow(dead_code)]
pub fn operator_identity(root_dir: &Path, name: &str, out: &Path) {
    ok(&[
        "identity",
        "create",
        "--data-dir",
        s(root_dir),
        "--role",
        "operator",
        "--name",
        name,
        "--out",
        s(out),
    ]);
}

/// `shoal apply --anchor URL --token T --identity FILE -f FILE`: an edit
/// made and signed on the operator's side; what it prints.
#[allow(dead_code)]
pub fn apply_signed(url: &str, token: &str, identity: &Path, file: &Path) -> String {
    apply_signed_with(url, token, identity, file, &[])
}

/// [`apply_signed`] with more arguments (`--ca FILE`).
#[allow(dead_code)]
pub fn apply_signed_with(
    url: &str,
    token: &str,
    identity: &Path,
    file: &Path,
    extra: &[&str],
) -> String {
    let mut args = vec![
        "apply",
        "--anchor",
        url,
        "--token",
        token,
        "--identity",
        s(identity),
        "-f",
        s(file),
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

/// Issues a site engineer identity of `site` on the operator's data dir.
pub fn site_engineer(operator_dir: &Path, site: &str, out: &Path) {
    ok(&[
        "identity",
        "create",
        "--data-dir",
        s(operator_dir),
        "--role",
        "site-engineer",
        "--site",
        site,
        "--name",
        "eng",
        "--out",
        s(out),
    ]);
}

/// Applies an App `web` at `version` on `dir` and waits until every one of
/// `nodes` holds it.
pub fn roll_out(dir: &Path, scratch: &Path, version: &str, nodes: &[&Path], within: Duration) {
    let app = write(
        scratch,
        &format!("web-{version}.yaml"),
        &app_yaml("web", version),
    );
    ok(&["apply", "--data-dir", s(dir), "-f", s(&app)]);
    for d in nodes {
        assert!(
            wait_for(within, || app_version(d, "web").as_deref() == Some(version)),
            "web {version} did not reach {}",
            d.display()
        );
    }
}

/// Waits until the anchor lists every one of `names` as connected.
pub fn all_connected(anchor_dir: &Path, names: &[&str], within: Duration) -> bool {
    wait_for(within, || {
        let nodes = get(anchor_dir, "nodes");
        names
            .iter()
            .all(|n| nodes[n]["connected"] == serde_json::json!(true))
    })
}

/// Fails (never skips) unless the test runs as root: namespaces need it.
pub fn require_root() {
    let out = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "this test needs root (ip netns, veth)"
    );
}

/// The pid a node recorded for one of its native apps.
pub fn app_pid(node_dir: &Path, app: &str) -> Option<i32> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node_dir.join("apps").join(app).join("pid")).ok()?)
            .ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

/// A live process (not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

/// Enrolls node `node` of `site` into `dir` with a token from the anchor's data dir.
pub fn enroll(anchor_dir: &Path, dir: &Path, node: &str, site: &str) {
    let token = ok(&[
        "fleet",
        "token",
        "create",
        "--data-dir",
        s(anchor_dir),
        "--node",
        node,
        "--site",
        site,
        "--ttl",
        "10m",
    ]);
    let out = ok(&[
        "node",
        "enroll",
        "--data-dir",
        s(dir),
        "--token",
        token.trim(),
    ]);
    assert!(
        out.contains(&format!("enrolled as node {node} of site {site}")),
        "{out}"
    );
}

/// Enrolls node `name` of `site` offline (a node bundle) into `root/<name>`.
pub fn bundle_node(anchor_dir: &Path, root: &Path, name: &str, site: &str) -> PathBuf {
    let b = root.join(format!("{name}.bundle"));
    ok(&[
        "fleet",
        "node-bundle",
        "--data-dir",
        s(anchor_dir),
        "--node",
        name,
        "--site",
        site,
        "--out",
        s(&b),
    ]);
    let d = root.join(name);
    ok(&["node", "enroll", "--data-dir", s(&d), "--bundle", s(&b)]);
    d
}

/// The CA (PEM) [`http`] trusts for `https://` URLs, once set (a bench
/// over HTTPS with the fleet's TLS CA).
static HTTP_CA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Makes [`http`] trust the CA certificates of the PEM file `ca` (only the
/// first call counts).
#[allow(dead_code)]
pub fn trust_ca(ca: &Path) {
    let _ = HTTP_CA.set(std::fs::read(ca).unwrap());
}

/// One HTTP request: (status, body). `token` goes in `Authorization: Bearer`.
pub fn http(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)));
    if let Some(pem) = HTTP_CA.get() {
        config = config.tls_config(cloud_anchor::client::trusting(pem).unwrap());
    }
    let agent: ureq::Agent = config.build().into();
    let auth = token.map(|t| format!("Bearer {t}"));
    let resp = match method {
        "POST" => {
            let mut r = agent.post(url).header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(body.unwrap_or("").as_bytes())
        }
        "PUT" => {
            let mut r = agent
                .put(url)
                .header("Content-Type", "application/octet-stream");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(body.unwrap_or("").as_bytes())
        }
        "DELETE" => {
            let mut r = agent.delete(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        _ => {
            let mut r = agent.get(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
    };
    match resp {
        Ok(mut r) => {
            let status = r.status().as_u16();
            (status, r.body_mut().read_to_string().unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// A request to a node's site API over TLS, as one of the node's apps
/// makes it (`Authorization: Bearer`): the node's certificate is checked
/// against the fleet root held in `root_dir` (a data dir made by `fleet
/// init`). Status 0 and the error when no answer came.
pub fn site_http(
    root_dir: &Path,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let root = crdt_state::local::datadir::root_public(root_dir).unwrap();
    let verifier = std::sync::Arc::new(daemon::tls::NodeVerifier::new(root, None));
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    match daemon::tls::request(
        verifier,
        method,
        url,
        &headers,
        body.unwrap_or("").as_bytes(),
        None,
    ) {
        Ok((status, body)) => (status, String::from_utf8_lossy(&body).into_owned()),
        Err(e) => (0, format!("{e:#}")),
    }
}

/// GET with a token, parsed as JSON (`Null` unless 200).
pub fn api_get(url: &str, token: &str) -> serde_json::Value {
    let (status, body) = http("GET", url, Some(token), None);
    if status != 200 {
        return serde_json::Value::Null;
    }
    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
}

/// One counter or gauge of an anchor's `/metrics` (0 when absent).
pub fn metric(url: &str, token: &str, name: &str) -> u64 {
    let (_, text) = http("GET", &format!("{url}/metrics"), Some(token), None);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The HTTP address an anchor started with `--http` wrote.
pub fn http_url(anchor_dir: &Path) -> String {
    assert!(
        wait_for(Duration::from_secs(20), || anchor_dir
            .join("http.addr")
            .exists()),
        "the anchor wrote no http.addr"
    );
    format!(
        "http://{}",
        std::fs::read_to_string(anchor_dir.join("http.addr"))
            .unwrap()
            .trim()
    )
}

/// Makes a fleet (`shoal fleet init`) in `dir`.
pub fn fleet_init(dir: &Path, name: &str) {
    ok(&["fleet", "init", "--data-dir", s(dir), "--name", name]);
}

/// Creates an admin's token on an anchor's data dir (the tests exercise
/// every route; `token_with_role` for the others).
pub fn operator_token(anchor_dir: &Path, name: &str) -> String {
    token_with_role(anchor_dir, name, "admin")
}

/// Creates a token with `role` on an anchor's data dir.
pub fn token_with_role(anchor_dir: &Path, name: &str, role: &str) -> String {
    ok(&[
        "operator",
        "token",
        "create",
        "--data-dir",
        s(anchor_dir),
        "--name",
        name,
        "--role",
        role,
    ])
    .trim()
    .to_string()
}

/// The `p` quantile (0..=1) of `v` (sorted in place), nearest rank.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// A process's resident memory in MB (`VmRSS`).
pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Pseudo-random bytes (xorshift from `seed`): no two 16 KiB groups alike,
/// the test data of artifacts.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `shoal artifact push --data-dir DIR FILE --name NAME`.
pub fn push_artifact(dir: &Path, file: &Path, name: &str) {
    ok(&[
        "artifact",
        "push",
        "--data-dir",
        s(dir),
        s(file),
        "--name",
        name,
    ]);
}

/// Group bytes a node read from peers' streams, from its log (one debug
/// line of `daemon::blobs` per group, written before the group is written
/// to disk).
pub fn blob_bytes_received(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("blob group received"))
        .filter_map(|l| l.split("bytes=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

// The Modbus TCP simulator (pymodbus, installed by scripts/test.sh).

pub fn python() -> String {
    std::env::var("SHOAL_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        let venv = format!("{home}/.cache/shoal/venv/bin/python");
        assert!(
            Path::new(&venv).exists(),
            "no Python with pymodbus: run ./scripts/test.sh (it makes {venv}) or set SHOAL_PYTHON"
        );
        venv
    })
}

pub fn sim_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sim/modbus_sim.py")
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn tcp_sim(port: u16, log: &Path) -> Proc {
    let child = Command::new(python())
        .arg(sim_script())
        .args(["tcp", "127.0.0.1", &port.to_string()])
        .stdout(Stdio::from(std::fs::File::create(log).unwrap()))
        .stderr(Stdio::from(
            std::fs::File::create(log.with_extension("err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let p = Proc(child);
    assert!(
        wait_for(Duration::from_secs(30), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "the Modbus simulator did not listen: {}",
        std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
    );
    p
}

/// A throwaway PostgreSQL cluster (Debian's `postgresql`, installed by
/// scripts/test.sh): its own data dir and port, trust authentication on
/// 127.0.0.1, stopped (immediately) when dropped.
pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
}

impl Postgres {
    /// initdb and start a cluster (as the `postgres` user when run as
    /// root: PostgreSQL refuses to run as root).
    pub fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("no PostgreSQL under /usr/lib/postgresql: run ./scripts/test.sh (it installs Debian's postgresql)");
        let dir = std::env::temp_dir().join(format!(
            "shoal-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pg = Postgres {
            dir,
            port: free_tcp_port(),
            bin,
        };
        if nix_is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres", s(&pg.dir)])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of {} failed", pg.dir.display());
        }
        let out = pg
            .as_owner(&pg.bin.join("initdb"))
            .args([
                "-D",
                s(&pg.dir.join("data")),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.ctl("start");
        pg
    }

    fn as_owner(&self, program: &Path) -> Command {
        if nix_is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// `pg_ctl start|stop|restart`, waiting for it.
    pub fn ctl(&self, what: &str) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            s(&self.dir)
        );
        let mut c = self.as_owner(&self.bin.join("pg_ctl"));
        c.args([
            "-D",
            s(&self.dir.join("data")),
            "-w",
            "-t",
            "60",
            "-m",
            "fast",
            "-o",
            &opts,
        ])
        .args(["-l", s(&self.dir.join("log"))])
        .arg(what);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {what}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    /// Where the anchor connects.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// One query through psql: its rows, `|`-separated (`None`: psql
    /// failed, e.g. the table is not made yet).
    pub fn query(&self, sql: &str) -> Option<String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .as_owner(&self.bin.join("pg_ctl"))
            .args(["-D", s(&self.dir.join("data")), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Starts an anchor on loopback: QUIC on `port`, its HTTP API on a free
/// port (see [`http_url`]).
pub fn anchor_with_http(dir: &Path, port: u16) -> Daemon {
    Daemon::start(
        "anchor",
        dir,
        &[
            "--listen".into(),
            format!("/ip4/127.0.0.1/udp/{port}/quic-v1"),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--insecure-http".into(),
        ],
        None,
    )
}

/// The peer id of a started anchor (from the addresses it wrote).
pub fn anchor_id(dir: &Path) -> String {
    let a: Vec<String> =
        serde_json::from_slice(&std::fs::read(dir.join("addrs.json")).unwrap()).unwrap();
    a[0].rsplit('/').next().unwrap().to_string()
}

/// The version a node's native `app` runs, from its process's command line
/// (an argument `<app>-<version>`), if one runs.
pub fn running_version(node_dir: &Path, app: &str) -> Option<String> {
    let pid = app_pid(node_dir, app)?;
    if !alive(pid) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let prefix = format!("{app}-");
    cmdline
        .split(|b| *b == 0)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .find_map(|a| a.strip_prefix(prefix.as_str()).map(String::from))
}
