//! `shoal demo`: an anchor and four nodes in two sites on this machine,
//! with the web UI, a sample app, and a switch per site that cuts its
//! link to the anchor.
//!
//! Everything is real: the anchor is the daemon of `shoal anchor run`
//! (in this process, so the UI's demo controls reach the links), the nodes
//! are `shoal node run` child processes on loopback QUIC running the sample
//! app (`shoal demo-app`) with the native runtime. Each site reaches the
//! anchor through its own user-space UDP link (`simulations::udp_link`);
//! cutting a site drops its packets both ways, as a dead uplink would, and
//! the nodes of a site stay connected to each other. A field engineer's
//! edit at a cut-off site goes through a node's site API, signed with her
//! key, exactly as `shoal site apply` does. Ctrl-C stops the nodes (which
//! stop their apps), then the anchor, and removes the demo's directory
//! unless `--dir` named one.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use crdt_state::{DataDir, Identity, Role, fleet::manifest};
use serde_json::{Value, json};
use simulations::udp_link::{LinkConfig, UdpLink};

use cloud_anchor::daemon as anchor;

/// The demo's sites and nodes.
pub const SITES: &[(&str, &[&str])] = &[
    ("north", &["north-1", "north-2"]),
    ("south", &["south-1", "south-2"]),
];

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn fleet_yaml(exe: &Path) -> String {
    format!(
        r#"apiVersion: shoal.dev/v1
kind: Config
metadata: {{ name: greeting }}
spec:
  data: {{ message: "Hello from the operator" }}
---
apiVersion: shoal.dev/v1
kind: App
metadata: {{ name: meter }}
spec:
  version: v1
  selector: {{ role: meter }}
  native:
    command: [{exe:?}, "demo-app"]
    files: {{ "message.txt": {{ config: greeting, key: message }} }}
    restart: always
"#,
        exe = exe.display().to_string()
    )
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One node of the demo.
struct DemoNode {
    name: String,
    site: String,
    dir: PathBuf,
}

/// What the UI's demo controls act on.
struct Controls {
    links: BTreeMap<String, UdpLink>,
    cut: Mutex<BTreeMap<String, bool>>,
    nodes: Vec<DemoNode>,
    site_api: BTreeMap<String, String>,
    engineers: BTreeMap<String, PathBuf>,
}

impl cloud_anchor::Demo for Controls {
    fn status(&self) -> Value {
        let cut = self.cut.lock().map(|c| c.clone()).unwrap_or_default();
        let sites: Vec<Value> = self
            .links
            .keys()
            .map(|s| {
                json!({
                    "name": s,
                    "cut": cut.get(s).copied().unwrap_or(false),
                    "engineer": self.engineers.get(s).and_then(|p| p.file_stem()).map(|s| s.to_string_lossy().into_owned()),
                })
            })
            .collect();
        let apps: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| {
                let status: Value = std::fs::read(n.dir.join("apps/meter/status.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or(Value::Null);
                json!({
                    "node": n.name,
                    "site": n.site,
                    "message": status["message"],
                    "running_s": status["count"],
                    "url": status["port"].as_u64().map(|p| format!("http://127.0.0.1:{p}/")),
                })
            })
            .collect();
        json!({ "sites": sites, "apps": apps })
    }

    fn set_cut(&self, site: &str, cut: bool) -> Result<(), String> {
        let link = self
            .links
            .get(site)
            .ok_or_else(|| format!("no site {site:?} in the demo"))?;
        link.set_cut(cut);
        if let Ok(mut c) = self.cut.lock() {
            c.insert(site.to_string(), cut);
        }
        tracing::info!(site, cut, "demo link switched");
        Ok(())
    }

    fn site_edit(&self, site: &str, config: &str, key: &str, value: &str) -> Result<(), String> {
        let url = self
            .site_api
            .get(site)
            .ok_or_else(|| format!("no site {site:?} in the demo"))?;
        let eng = self
            .engineers
            .get(site)
            .ok_or_else(|| format!("no engineer for {site:?}"))?;
        let text = serde_json::to_string(&json!({
            "apiVersion": manifest::API_VERSION,
            "kind": "SiteOverride",
            "metadata": { "name": site },
            "spec": { "configs": { config: { "data": { key: value } } } },
        }))
        .map_err(|e| e.to_string())?;
        let m = manifest::parse("site edit", &text).map_err(|e| e.to_string())?;
        node::site_api::apply(url, eng, &m).map_err(|e| format!("{e:#}"))?;
        Ok(())
    }
}

/// What `prepare` made.
struct Prepared {
    nodes: Vec<DemoNode>,
    anchor: Identity,
    token: String,
    engineers: BTreeMap<String, PathBuf>,
}

/// Sets up the fleet: data dirs of the anchor and the nodes, engineers, a token.
fn prepare(root: &Path, exe: &Path) -> anyhow::Result<Prepared> {
    let anchor_dir = root.join("anchor");
    let mut dd = DataDir::init(&anchor_dir, "demo", now())?;
    dd.apply(&manifest::parse("demo fleet", &fleet_yaml(exe))?, now())?;
    let labels: BTreeMap<String, String> = [("role".to_string(), "meter".to_string())].into();
    let mut nodes = Vec::new();
    let mut engineers = BTreeMap::new();
    // Engineers first: the node bundles then carry their certificates, so
    // a site's nodes know its engineer before they ever reach the anchor.
    for (site, _) in SITES {
        let name = format!("eng-{site}");
        let id = dd.create_identity(Role::SiteEngineer, Some(site), &name, now())?;
        let file = root.join(format!("{name}.json"));
        id.write(&file)?;
        engineers.insert(site.to_string(), file);
    }
    for (site, names) in SITES {
        for n in *names {
            let bundle = root.join(format!("{n}.bundle"));
            daemon::enroll::node_bundle(&mut dd, n, Some(site), &labels, &bundle, now())?;
            nodes.push(DemoNode {
                name: n.to_string(),
                site: site.to_string(),
                dir: root.join(n),
            });
        }
    }
    let me = anchor::anchor_identity(&mut dd, now())?;
    drop(dd);
    for n in &nodes {
        daemon::enroll::enroll_with_bundle(&n.dir, &root.join(format!("{}.bundle", n.name)))?;
        let _ = std::fs::remove_file(root.join(format!("{}.bundle", n.name)));
    }
    let token = cloud_anchor::tokens::create(
        &anchor_dir,
        "demo",
        cloud_anchor::tokens::ApiRole::Admin,
        None,
        None,
        now(),
    )?;
    Ok(Prepared {
        nodes,
        anchor: me,
        token,
        engineers,
    })
}

fn peer_id(id: &Identity) -> anyhow::Result<mesh::PeerId> {
    mesh::peer_id_of(&id.key().0).ok_or_else(|| anyhow!("no peer id for {}", id.cert.name))
}

/// Runs the demo until Ctrl-C.
pub fn run(dir: Option<PathBuf>, http: SocketAddr) -> anyhow::Result<()> {
    let (root, remove) = match dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("shoal-demo-{}", std::process::id())),
            true,
        ),
    };
    if root.exists() && std::fs::read_dir(&root)?.next().is_some() {
        bail!(
            "{} is not empty: give an empty or new --dir",
            root.display()
        );
    }
    std::fs::create_dir_all(root.join("logs"))?;
    let r = run_in(&root, http);
    if remove {
        let _ = std::fs::remove_dir_all(&root);
    }
    r
}

fn run_in(root: &Path, http: SocketAddr) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the shoal binary")?;
    // Fail early and clearly if the UI's port is taken.
    drop(
        std::net::TcpListener::bind(http).with_context(|| {
            format!("the UI's address {http} is in use: pass another with --http")
        })?,
    );
    let Prepared {
        nodes,
        anchor: anchor_id,
        token,
        engineers,
    } = prepare(root, &exe)?;
    let anchor_peer = peer_id(&anchor_id)?;
    let anchor_port = free_udp_port()?;
    let upstream: SocketAddr = ([127, 0, 0, 1], anchor_port).into();
    let mut links = BTreeMap::new();
    for (site, _) in SITES {
        let link = UdpLink::start(([127, 0, 0, 1], 0).into(), upstream, LinkConfig::default())?;
        links.insert(site.to_string(), link);
    }
    let mut site_api = BTreeMap::new();
    let mut plan = Vec::new();
    let mut first_of_site: BTreeMap<String, String> = BTreeMap::new();
    for n in &nodes {
        let port = free_udp_port()?;
        let id = Identity::read(&n.dir.join(crdt_state::local::datadir::IDENTITY_FILE))?;
        let me = format!("/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{}", peer_id(&id)?);
        let link = &links[&n.site];
        let mut args = vec![
            "node".to_string(),
            "run".into(),
            "--data-dir".into(),
            n.dir.display().to_string(),
            "--listen".into(),
            format!("/ip4/127.0.0.1/udp/{port}/quic-v1"),
            "--peer".into(),
            format!(
                "/ip4/127.0.0.1/udp/{}/quic-v1/p2p/{anchor_peer}",
                link.addr().port()
            ),
        ];
        match first_of_site.get(&n.site) {
            Some(first) => {
                args.push("--peer".into());
                args.push(first.clone());
            }
            None => {
                let api = free_tcp_port()?;
                args.push("--site-api".into());
                args.push(format!("127.0.0.1:{api}"));
                site_api.insert(n.site.clone(), format!("https://127.0.0.1:{api}"));
                first_of_site.insert(n.site.clone(), me);
            }
        }
        plan.push((n.name.clone(), args));
    }
    let controls = Arc::new(Controls {
        links,
        cut: Mutex::new(BTreeMap::new()),
        nodes,
        site_api,
        engineers,
    });
    let opts = anchor::Options {
        mesh: daemon::driver::MeshOptions {
            data_dir: root.join("anchor"),
            listen: vec![format!("/ip4/127.0.0.1/udp/{anchor_port}/quic-v1").parse()?],
            peers: Vec::new(),
            mdns: false,
            blob_quota: None,
        },
        http: Some(http),
        demo: Some(controls.clone()),
        readings_db: None,
        // A demo on one machine's loopback; the UI shows that it is plain
        // HTTP.
        tls: None,
        retention: Some(std::time::Duration::from_secs(7 * 86_400)),
        failed_logins_per_minute: cloud_anchor::api::FAILED_LOGINS_PER_MINUTE,
        audit_retention: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let anchor = rt.spawn(anchor::run(opts, async move {
        let _ = stop_rx.await;
    }));
    // Wait for the anchor's UI before starting nodes.
    let http_file = root.join("anchor").join(anchor::HTTP_ADDR_FILE);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_file.exists() {
        if anchor.is_finished() || Instant::now() > deadline {
            let _ = stop_tx.send(());
            return match rt.block_on(anchor) {
                Ok(Err(e)) => Err(e),
                _ => Err(anyhow!("the anchor did not start")),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut children: Vec<(String, Child)> = Vec::new();
    let started = (|| {
        for (name, args) in &plan {
            let log = std::fs::File::create(root.join("logs").join(format!("{name}.log")))?;
            let child = Command::new(&exe)
                .args(args)
                .env(
                    "SHOAL_LOG",
                    std::env::var("SHOAL_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting node {name}"))?;
            children.push((name.clone(), child));
        }
        anyhow::Ok(())
    })();
    if started.is_ok() {
        daemon::say!();
        daemon::say!(
            "Shoal demo: an anchor and {} nodes in sites north and south, on this machine.",
            children.len()
        );
        daemon::say!("  web UI:  http://{http}/#token={token}");
        daemon::say!("  token:   {token}");
        daemon::say!("  data:    {}", root.display());
        daemon::say!(
            "Open the UI, then the Demo page: cut a site off, edit on both sides, restore it."
        );
        daemon::say!("Ctrl-C stops everything.");
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        });
        daemon::say!("stopping the nodes and their apps…");
    }
    stop_children(&mut children);
    let _ = stop_tx.send(());
    let r = rt.block_on(anchor);
    rt.shutdown_timeout(Duration::from_secs(2));
    started?;
    match r {
        Ok(r) => r,
        Err(e) => Err(anyhow!("the anchor task failed: {e}")),
    }
}

/// SIGTERM to every node (each stops its apps), SIGKILL after 15 s.
fn stop_children(children: &mut [(String, Child)]) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for (_, c) in children.iter() {
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for (name, c) in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    tracing::warn!(node = %name, "did not stop in time; killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
    }
}
