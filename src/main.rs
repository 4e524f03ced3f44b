//! The `shoal` command line: parses arguments and dispatches to the crates;
//! the CLI's own glue (printing a verb's reply, reading manifests from files
//! or stdin, choosing between a data dir, its daemon's socket and
//! `--anchor`) lives here, and `shoal demo` in `demo.rs`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod demo;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;

use crdt_state::{DataDir, Role, fleet::manifest};
use daemon::command::Command as Verb;
use daemon::control;
use daemon::render::Format;
use node::daemon::RuntimeChoice;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Offline-first, peer-to-peer edge mesh"
)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Dir {
    /// The data directory (store, identity).
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: PathBuf,
}

/// Where a verb acts: a data dir, or an anchor's API.
#[derive(Args, Clone)]
struct Target {
    /// The data directory (store, identity).
    #[arg(long, env = "SHOAL_DATA_DIR", required_unless_present = "anchor")]
    data_dir: Option<PathBuf>,
    /// An anchor's API (http://host:port) instead of a data dir.
    #[arg(
        long,
        env = "SHOAL_ANCHOR",
        conflicts_with = "data_dir",
        requires = "token"
    )]
    anchor: Option<String>,
    /// Operator token for --anchor (from `shoal operator token create`).
    #[arg(long, env = "SHOAL_TOKEN")]
    token: Option<String>,
    /// Trust this CA (PEM; the fleet's tls-ca.pem) for an https:// anchor,
    /// instead of the public CAs.
    #[arg(long, env = "SHOAL_CA", requires = "anchor")]
    ca: Option<PathBuf>,
}

impl Target {
    fn client(&self) -> anyhow::Result<Option<cloud_anchor::client::Client>> {
        self.anchor
            .as_deref()
            .map(|a| {
                cloud_anchor::client::Client::with_ca(
                    a,
                    self.token.as_deref().unwrap_or(""),
                    self.ca.as_deref(),
                )
            })
            .transpose()
    }

    fn dir(&self) -> anyhow::Result<&Path> {
        self.data_dir
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("pass --data-dir or --anchor"))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create and manage the fleet.
    #[command(subcommand)]
    Fleet(FleetCmd),
    /// Apply manifests (App, Config, Node, SiteOverride).
    Apply {
        #[command(flatten)]
        target: Target,
        /// Manifest files; `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Sign with this identity file instead of the data dir's; with
        /// --anchor, the edit is made and signed here and the anchor only
        /// checks it.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Output format: table, json or yaml.
        #[arg(short = 'o', long, default_value = "table")]
        output: Format,
    },
    /// Delete an app, config, node, device, profile, artifact or a site's overrides.
    Delete {
        #[command(flatten)]
        target: Target,
        /// app, config, node, site, device, profile or artifact.
        kind: String,
        /// Its name.
        name: String,
        /// Sign with this identity file instead of the data dir's; with
        /// --anchor, the edit is made and signed here and the anchor only
        /// checks it.
        #[arg(long)]
        identity: Option<PathBuf>,
    },
    /// A staged rollout (an App with spec.rollout whose spec changed):
    /// where each wave stands, or pause, resume or abort it.
    Rollout {
        /// status, pause, resume or abort.
        #[arg(value_parser = ["status", "pause", "resume", "abort"])]
        action: String,
        /// The app.
        app: String,
        #[command(flatten)]
        target: Target,
        /// Output format of the status: table, json or yaml.
        #[arg(short = 'o', long, default_value = "table")]
        output: Format,
    },
    /// Show apps, configs, nodes, sites, profiles, devices, artifacts or conflicts.
    Get {
        /// apps, configs, nodes, sites, profiles, devices, artifacts or conflicts.
        what: String,
        #[command(flatten)]
        target: Target,
        /// Output format: table, json or yaml.
        #[arg(short = 'o', long, default_value = "table")]
        output: Format,
    },
    /// Writer identities.
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// Operators of the anchor's HTTP API and web UI.
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// The always-on anchor.
    #[command(subcommand)]
    Anchor(AnchorCmd),
    /// An edge node.
    #[command(subcommand)]
    Node(NodeCmd),
    /// A node's local site API, for field engineers on the substation LAN.
    #[command(subcommand)]
    Site(SiteCmd),
    /// A node's field devices, through its site API.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Large files for apps (AI models, firmware): pushed once, carried to
    /// the nodes that need them, verified.
    #[command(subcommand)]
    Artifact(ArtifactCmd),
    /// Data that came up from the nodes (device readings, app records).
    #[command(subcommand)]
    Data(DataCmd),
    /// Offline bundles for sites with no network.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// The store file.
    #[command(subcommand)]
    Store(StoreCmd),
    /// The deterministic partition simulator.
    #[command(subcommand)]
    Sim(SimCmd),
    /// An anchor and four nodes in two sites on this machine, a sample
    /// app, and the web UI on http://127.0.0.1:8080; Ctrl-C stops it all.
    Demo {
        /// Where to keep the demo's data dirs (default: a fresh temporary directory, removed at exit).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The web UI's address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: std::net::SocketAddr,
        /// Run the old scripted tour of the foundation instead (no daemons).
        #[arg(long)]
        tour: bool,
    },
    /// The demo's sample app (started by `shoal demo` on its nodes).
    #[command(hide = true)]
    DemoApp,
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Latest values of a device (or one resource's readings over --since).
    Read {
        /// The node's site API (http://host:port).
        #[arg(long)]
        node: String,
        /// Your site engineer identity file.
        #[arg(long)]
        identity: PathBuf,
        /// The device (all, with --json).
        device: Option<String>,
        /// One resource.
        resource: Option<String>,
        /// Stored readings over this window (90s, 30m, 1h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// The node's whole device state as JSON.
        #[arg(long)]
        json: bool,
        /// Follow live readings (one JSON line per poll) until interrupted.
        #[arg(long, conflicts_with_all = ["since", "json"])]
        follow: bool,
    },
    /// Set a writable resource (a setpoint in the site's overrides) and wait for the device to take it.
    Write {
        /// The node's site API (http://host:port).
        #[arg(long)]
        node: String,
        /// Your site engineer identity file.
        #[arg(long)]
        identity: PathBuf,
        /// The device.
        device: String,
        /// The resource.
        resource: String,
        /// The value (JSON: 21.5, true, "text"; bare words are text).
        value: String,
        /// How long to wait for the node to write and read it back.
        #[arg(long, default_value = "20s")]
        wait: String,
    },
}

#[derive(Subcommand)]
enum OperatorCmd {
    /// API tokens.
    #[command(subcommand)]
    Token(OperatorTokenCmd),
}

#[derive(Subcommand)]
enum OperatorTokenCmd {
    /// Create a token for an operator (printed once; only its hash is kept).
    Create {
        #[command(flatten)]
        dir: Dir,
        /// The operator's name (recorded in the changes they make).
        #[arg(long)]
        name: String,
        /// What the token may do: viewer (reads), site-engineer (reads and
        /// its site's SiteOverride; needs --site), operator (fleet edits),
        /// admin (also decommissions nodes).
        #[arg(long, default_value = "operator")]
        role: cloud_anchor::tokens::ApiRole,
        /// The site of a site engineer's token.
        #[arg(long)]
        site: Option<String>,
        /// Lifetime (90s, 30m, 1h, 7d); default: until revoked.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List operators with tokens.
    List {
        #[command(flatten)]
        dir: Dir,
    },
    /// Revoke every token of an operator.
    Revoke {
        #[command(flatten)]
        dir: Dir,
        /// The operator's name.
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum FleetCmd {
    /// Create the fleet root key, a first operator identity and the fleet document.
    Init {
        #[command(flatten)]
        dir: Dir,
        /// Fleet name.
        #[arg(long, default_value = "fleet")]
        name: String,
    },
    /// One-time enrollment tokens for nodes.
    #[command(subcommand)]
    Token(TokenCmd),
    /// An offline enrollment file for an air-gapped node (holds its secret key).
    NodeBundle {
        #[command(flatten)]
        dir: Dir,
        #[command(flatten)]
        node: NodeArgs,
        /// Where to write the file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Takes the fleet root key and the operator identity off a stopped
    /// anchor's data dir (ADR 0013): they go to a new data dir for your
    /// machine, and the anchor gets an issuer that enrolls nodes of the
    /// sites named (every site with a registered node when none is).
    Migrate {
        #[command(flatten)]
        dir: Dir,
        /// The new data dir for the operator's machine (root key, operator
        /// identity, the documents); carry it off the anchor's host.
        #[arg(long)]
        out: PathBuf,
        /// A site the anchor's issuer enrolls nodes of (repeatable).
        #[arg(long = "site")]
        sites: Vec<String>,
        /// The issuer's name.
        #[arg(long, default_value = "anchor-issuer")]
        issuer_name: String,
    },
    /// A TLS server certificate for an anchor's API, from the fleet's TLS
    /// CA (made beside the root key the first time: give its tls-ca.pem to
    /// browsers and to `--ca`).
    TlsCert {
        #[command(flatten)]
        dir: Dir,
        /// A DNS name or IP address the anchor is reached at (repeatable).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Directory to write tls.pem (chain), tls.key and tls-ca.pem to.
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Args, Clone)]
struct NodeArgs {
    /// The node's name.
    #[arg(long)]
    node: String,
    /// Its site (default: the node's name).
    #[arg(long)]
    site: Option<String>,
    /// A label, key=value (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
}

impl NodeArgs {
    fn labels(&self) -> anyhow::Result<BTreeMap<String, String>> {
        self.labels
            .iter()
            .map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| anyhow::anyhow!("label {l:?} is not key=value"))
            })
            .collect()
    }
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token (printed); the node enrolls with `shoal node enroll --token`.
    Create {
        #[command(flatten)]
        dir: Dir,
        #[command(flatten)]
        node: NodeArgs,
        /// Lifetime: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The operator identity that grants the node (ADR 0013; the data
        /// dir's own when absent).
        #[arg(long)]
        identity: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct MeshArgs {
    /// Listen address (repeatable), e.g. /ip4/0.0.0.0/udp/7411/quic-v1.
    #[arg(long)]
    listen: Vec<String>,
    /// Peer to keep connected to (repeatable, or comma-separated in
    /// SHOAL_PEERS), ending in /p2p/<peer id>.
    #[arg(long, env = "SHOAL_PEERS", value_delimiter = ',')]
    peer: Vec<String>,
    /// Discover peers on the local network with mDNS.
    #[arg(long, default_value_t = false)]
    mdns: bool,
    /// Most bytes the blob store (artifacts) may hold: 500M, 20G, or bytes.
    #[arg(long, value_parser = parse_size)]
    blob_quota: Option<u64>,
}

/// A size: bytes, or with K, M, G or T (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: expected a number with K, M, G or T")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (500M, 20G, or bytes)"))
}

impl MeshArgs {
    fn parse(&self) -> anyhow::Result<(Vec<mesh::Multiaddr>, Vec<mesh::Multiaddr>)> {
        let p = |s: &String| {
            s.parse::<mesh::Multiaddr>()
                .map_err(|e| anyhow::anyhow!("{s:?} is not a multiaddr: {e}"))
        };
        Ok((
            self.listen.iter().map(p).collect::<Result<_, _>>()?,
            self.peer
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(p)
                .collect::<Result<_, _>>()?,
        ))
    }
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum AnchorCmd {
    /// Run the anchor: holds every document, enrolls nodes, serves relay.
    Run {
        #[command(flatten)]
        dir: Dir,
        #[command(flatten)]
        mesh: MeshArgs,
        /// Serve the operator HTTP API and web UI here (e.g. 0.0.0.0:8443),
        /// over TLS with --tls-cert and --tls-key.
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// The certificate chain (PEM, leaf first) the API serves: from
        /// your CA, or `shoal fleet tls-cert`.
        #[arg(long, requires = "tls_key", conflicts_with = "insecure_http")]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP: tokens and edits cross the network readable by
        /// anyone on the path. For a loopback or a lab only; the UI says so
        /// on every page.
        #[arg(long)]
        insecure_http: bool,
        /// Copy the data that comes up from the nodes to this PostgreSQL
        /// too (postgres://user@host/db; table shoal_readings, made if
        /// missing).
        #[arg(long, env = "SHOAL_READINGS_DB")]
        readings_db: Option<String>,
        /// Keep the data that came up this long in the anchor's own store
        /// (e.g. 30d; for ever if absent).
        #[arg(long)]
        retention: Option<String>,
        /// Failed logins (wrong, expired or revoked tokens) one client
        /// address may make in a minute; past that its wrong tokens get 429
        /// until the minute is over. 0: no limit.
        #[arg(long, default_value_t = cloud_anchor::api::FAILED_LOGINS_PER_MINUTE)]
        failed_logins_per_minute: u32,
        /// Keep timeline and security-log entries this long (e.g. 365d);
        /// without it, the newest 10,000 and 2,000 whatever their age.
        /// Replicas exchange their entries either way.
        #[arg(long)]
        audit_retention: Option<String>,
    },
    /// Make a replica's data dir from a seed directory (root.key,
    /// identity.json, operators.json, fleet.bundle); it gets its own anchor
    /// certificate when it first runs.
    ReplicaInit {
        #[command(flatten)]
        dir: Dir,
        /// The seed directory.
        #[arg(long)]
        seed: PathBuf,
    },
    /// Write a seed directory for anchor replicas from this anchor's data dir.
    ReplicaSeed {
        #[command(flatten)]
        dir: Dir,
        /// The seed directory to create.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Enroll this node: with a token (online) or an offline node bundle.
    Enroll {
        #[command(flatten)]
        dir: Dir,
        /// The token from `shoal fleet token create`.
        #[arg(long, conflicts_with = "bundle", required_unless_present = "bundle")]
        token: Option<String>,
        /// The file from `shoal fleet node-bundle`.
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
    /// Run the node daemon.
    Run {
        #[command(flatten)]
        dir: Dir,
        #[command(flatten)]
        mesh: MeshArgs,
        /// Serve the local site API for field engineers and the node's apps
        /// here (e.g. 0.0.0.0:7480), over TLS with a certificate for the
        /// node's own key.
        #[arg(long)]
        site_api: Option<std::net::SocketAddr>,
        /// Serve the site API as plain HTTP: engineers' edits and readings
        /// cross the LAN readable by anyone on it. For apps that cannot do
        /// TLS, on a trusted network only.
        #[arg(long, requires = "site_api")]
        site_api_insecure_http: bool,
        /// Where apps run: native (processes) or kube (the local K3s).
        #[arg(long, default_value = "native")]
        runtime: String,
        /// Kubeconfig for --runtime kube (default: in-cluster, then KUBECONFIG).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Most device readings kept in the store; the oldest are dropped beyond it.
        #[arg(long, default_value_t = node::daemon::DEFAULT_READINGS_CAP)]
        readings_cap: u64,
        /// Seconds per summary of the unacknowledged readings dropped at the
        /// cap (what goes up in their place).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        summary_interval: u64,
    },
}

#[derive(Subcommand)]
enum SiteCmd {
    /// Apply a SiteOverride through a node's site API, signed with your identity.
    Apply {
        /// The node's site API (http://host:port).
        #[arg(long)]
        node: String,
        /// Your site engineer identity file.
        #[arg(long)]
        identity: PathBuf,
        /// Manifest files; `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Output format: table, json or yaml.
        #[arg(short = 'o', long, default_value = "table")]
        output: Format,
    },
    /// Show a node's view: desired workloads, their state, peers, site overrides.
    Get {
        /// The node's site API (http://host:port).
        #[arg(long)]
        node: String,
        /// Your site engineer identity file.
        #[arg(long)]
        identity: PathBuf,
        /// Output format: json or yaml.
        #[arg(short = 'o', long, default_value = "yaml")]
        output: Format,
    },
}

fn parse_ttl(s: &str) -> anyhow::Result<i64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("bad lifetime {s:?}: expected e.g. 90s, 30m, 1h, 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => anyhow::bail!("bad lifetime {s:?}: expected e.g. 90s, 30m, 1h, 7d"),
    };
    Ok(n * mult)
}

fn as_yaml(v: &serde_json::Value) -> String {
    daemon::render::render(Format::Yaml, v, &[], Vec::new())
}

/// What a daemon runs: an edge node or an anchor.
enum Daemon {
    Node {
        site_api: Option<std::net::SocketAddr>,
        site_api_tls: bool,
        runtime: RuntimeChoice,
        readings_cap: u64,
        summary_ms: u64,
    },
    Anchor {
        http: Option<std::net::SocketAddr>,
        tls: Option<std::sync::Arc<daemon::tls::ServerConfig>>,
        readings_db: Option<String>,
        retention: Option<std::time::Duration>,
        failed_logins_per_minute: u32,
        audit_retention: Option<std::time::Duration>,
    },
}

fn run_daemon(dir: Dir, mesh: &MeshArgs, which: Daemon) -> anyhow::Result<()> {
    let (listen, peers) = mesh.parse()?;
    let mesh = daemon::driver::MeshOptions {
        data_dir: dir.data_dir,
        listen,
        peers,
        mdns: mesh.mdns,
        blob_quota: mesh.blob_quota,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        match which {
            Daemon::Node {
                site_api,
                site_api_tls,
                runtime,
                readings_cap,
                summary_ms,
            } => {
                let opts = node::daemon::Options {
                    mesh,
                    site_api,
                    site_api_tls,
                    runtime,
                    readings_cap,
                    summary_ms,
                };
                node::daemon::run(opts, shutdown).await
            }
            Daemon::Anchor {
                http,
                tls,
                readings_db,
                retention,
                failed_logins_per_minute,
                audit_retention,
            } => {
                let opts = cloud_anchor::daemon::Options {
                    mesh,
                    http,
                    tls,
                    demo: None,
                    readings_db,
                    retention,
                    failed_logins_per_minute,
                    audit_retention,
                };
                cloud_anchor::daemon::run(opts, shutdown).await
            }
        }
    })
}

/// Runs a data-dir verb (through the daemon's socket if one holds the dir)
/// and prints its output.
fn verb(dir: &Path, identity: Option<&Path>, req: Verb) -> anyhow::Result<control::Reply> {
    let reply = control::run(dir, identity, req)?;
    if let Some(e) = reply.error {
        anyhow::bail!(e);
    }
    print!("{}", reply.stdout);
    Ok(control::Reply {
        error: None,
        ..reply
    })
}

fn identity_text(identity: Option<&Path>) -> anyhow::Result<Option<String>> {
    identity
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("{}", p.display())))
        .transpose()
}

#[derive(Subcommand)]
enum IdentityCmd {
    /// Issue a certificate and key for another writer (needs the root key).
    Create {
        #[command(flatten)]
        dir: Dir,
        /// operator, site-engineer, anchor, node or issuer.
        #[arg(long)]
        role: Role,
        /// The site (site engineers and nodes); an issuer's sites, once
        /// each (`--site north --site south`).
        #[arg(long = "site")]
        sites: Vec<String>,
        /// The writer's name.
        #[arg(long)]
        name: String,
        /// Where to write the identity file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Make an identity file this data dir's writer (creates the data dir).
    Use {
        #[command(flatten)]
        dir: Dir,
        /// The identity file.
        file: PathBuf,
    },
    /// Revoke a writer: its changes made so far stay, any other is refused.
    /// With --anchor, the revocation is made and signed here with
    /// --identity (an operator's, where the root is) and sent to the
    /// anchor, which checks it like any synced change.
    Revoke {
        #[command(flatten)]
        target: Target,
        /// Sign with this identity file (required with --anchor).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// The writer's name or public key (hex).
        who: String,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show this data dir's identity.
    Show {
        #[command(flatten)]
        dir: Dir,
    },
    /// Invite an operator or a site engineer to enroll a key in their
    /// browser: prints a one-time code for them to enter in the web UI
    /// (an admin's token).
    Invite {
        #[command(flatten)]
        anchor: AnchorApi,
        /// operator or site-engineer.
        #[arg(long)]
        role: Role,
        /// A site engineer's site.
        #[arg(long)]
        site: Option<String>,
        /// The writer's name.
        #[arg(long)]
        name: String,
        /// How long the code is good for (30m, 12h, 7d).
        #[arg(long, default_value = "1d")]
        ttl: String,
    },
    /// Certify, with the fleet root key of --data-dir, the browser key an
    /// invited writer enrolled, after checking the fingerprint their
    /// browser shows; the anchor publishes the certificate.
    Approve {
        #[command(flatten)]
        dir: Dir,
        #[command(flatten)]
        anchor: AnchorApi,
        /// The writer's name (as invited).
        #[arg(long)]
        name: String,
        /// The fingerprint the browser shows (at least 16 hex digits).
        #[arg(long)]
        fingerprint: String,
    },
}

/// An anchor's API, for verbs that only it answers.
#[derive(Args, Clone)]
struct AnchorApi {
    /// The anchor's API (https://host:port).
    #[arg(long, env = "SHOAL_ANCHOR")]
    anchor: String,
    /// Operator token (`identity invite|approve`: an admin's).
    #[arg(long, env = "SHOAL_TOKEN")]
    token: String,
    /// Trust this CA (PEM; the fleet's tls-ca.pem) for an https://
    /// anchor, instead of the public CAs.
    #[arg(long, env = "SHOAL_CA")]
    ca: Option<PathBuf>,
}

impl AnchorApi {
    fn client(&self) -> anyhow::Result<cloud_anchor::client::Client> {
        cloud_anchor::client::Client::with_ca(&self.anchor, &self.token, self.ca.as_deref())
    }
}

#[derive(Subcommand)]
enum SimCmd {
    /// Run a scenario file.
    Run {
        /// The scenario (TOML).
        file: PathBuf,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Write the JSON report here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write an SVG plot of agreement over time here.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Check every page of the store file against its checksum.
    Check {
        #[command(flatten)]
        dir: Dir,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Print a node's series as it landed at an anchor: records (or per
    /// --step), the summaries of what the node's quota dropped, and gaps.
    Read {
        #[command(flatten)]
        anchor: AnchorApi,
        /// The node.
        node: String,
        /// The series: `device/resource`, or `app/<app>/<series>`.
        series: String,
        /// How far back (e.g. 90s, 30m, 1h, 7d).
        #[arg(long, default_value = "1d")]
        since: String,
        /// One point per this long (count, min, max, mean), e.g. 1m; every
        /// record if absent.
        #[arg(long)]
        step: Option<String>,
        /// table, csv or json.
        #[arg(short, long, default_value = "table")]
        output: String,
    },
}

#[derive(Subcommand)]
enum ArtifactCmd {
    /// Hash a file, put it in the data dir's blob store and declare it as
    /// an Artifact in the fleet document.
    Push {
        #[command(flatten)]
        dir: Dir,
        /// The file.
        file: PathBuf,
        /// The artifact's name (what apps name in spec.artifacts).
        #[arg(long)]
        name: String,
        /// Media type (application/onnx, …).
        #[arg(long)]
        media_type: Option<String>,
        /// What it is.
        #[arg(long)]
        description: Option<String>,
        /// Sign with this identity file instead of the data dir's.
        #[arg(long)]
        identity: Option<PathBuf>,
    },
    /// Take a file carried to the site (a USB stick) as an artifact the
    /// fleet document names: refused unless it hashes to what it names.
    Import {
        #[command(flatten)]
        dir: Dir,
        /// The file.
        file: PathBuf,
        /// The artifact it is.
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum BundleCmd {
    /// Write every document's signed changes to a file.
    Export {
        #[command(flatten)]
        dir: Dir,
        /// The bundle file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify a bundle and merge it (refused whole if anything is bad).
    Import {
        #[command(flatten)]
        dir: Dir,
        /// The bundle file.
        file: PathBuf,
    },
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn read_input(path: &Path) -> anyhow::Result<(String, String)> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .take(manifest::MAX_MANIFEST_BYTES as u64 + 1)
            .read_to_string(&mut s)
            .context("reading standard input")?;
        return Ok(("-".into(), s));
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    Ok((path.display().to_string(), text))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Fleet(FleetCmd::Init { dir, name }) => {
            let dd = DataDir::init(&dir.data_dir, &name, now())?;
            println!(
                "fleet {name} created in {} (root {}, operator admin)",
                dir.data_dir.display(),
                dd.trust().root().short()
            );
        }
        Command::Apply {
            target,
            files,
            identity,
            output,
        } => {
            let mut texts = Vec::new();
            for f in &files {
                texts.push(read_input(f)?);
            }
            // Malformed manifests are refused here, before anything is sent.
            for (label, text) in &texts {
                manifest::parse(label, text)?;
            }
            if let Some(c) = target.client()? {
                match &identity {
                    // Signed here, with the operator's own key.
                    Some(file) => {
                        let mut manifests = Vec::new();
                        for (label, text) in &texts {
                            manifests.extend(manifest::parse(label, text)?);
                        }
                        let applied = c.apply_signed(file, &manifests)?;
                        print!("{}", daemon::render::applied(output, &applied));
                    }
                    None => print!("{}", c.apply(&texts, &output.to_string())?),
                }
                return Ok(());
            }
            let req = Verb::Apply {
                files: texts,
                identity: identity_text(identity.as_deref())?,
                output: Some(output.to_string()),
            };
            verb(target.dir()?, identity.as_deref(), req)?;
        }
        Command::Delete {
            target,
            kind,
            name,
            identity,
        } => {
            if let Some(c) = target.client()? {
                match &identity {
                    Some(file) => print!("{}", c.delete_signed(file, &kind, &name)?),
                    None => print!("{}", c.delete(&kind, &name)?),
                }
                return Ok(());
            }
            let req = Verb::Delete {
                kind,
                name,
                identity: identity_text(identity.as_deref())?,
                output: Some("table".into()),
            };
            verb(target.dir()?, identity.as_deref(), req)?;
        }
        Command::Rollout {
            action,
            app,
            target,
            output,
        } => {
            if let Some(c) = target.client()? {
                print!("{}", c.rollout(&app, &action, &output.to_string())?);
                return Ok(());
            }
            let req = Verb::Rollout {
                app,
                action,
                output: Some(output.to_string()),
            };
            verb(target.dir()?, None, req)?;
        }
        Command::Get {
            what,
            target,
            output,
        } => {
            if let Some(c) = target.client()? {
                print!("{}", c.get(&what, &output.to_string())?);
                return Ok(());
            }
            let req = Verb::Get {
                what,
                output: output.to_string(),
            };
            verb(target.dir()?, None, req)?;
        }
        Command::Operator(OperatorCmd::Token(OperatorTokenCmd::Create {
            dir,
            name,
            role,
            site,
            ttl,
        })) => {
            let ttl = ttl.as_deref().map(parse_ttl).transpose()?;
            let token = cloud_anchor::tokens::create(
                &dir.data_dir,
                &name,
                role,
                site.as_deref(),
                ttl,
                now(),
            )?;
            println!("{token}");
            eprintln!("{role} {name}: keep this token; only its hash is stored");
        }
        Command::Operator(OperatorCmd::Token(OperatorTokenCmd::List { dir })) => {
            let rows = cloud_anchor::tokens::read(&dir.data_dir)?
                .into_iter()
                .map(|t| {
                    vec![
                        t.name,
                        t.role.to_string(),
                        t.site.unwrap_or_else(|| "-".into()),
                        t.created_at.to_string(),
                        t.expires_at
                            .map(|e| e.to_string())
                            .unwrap_or_else(|| "-".into()),
                        // A hand-edited file may hold anything: never slice blindly.
                        t.sha256.get(..12).unwrap_or(&t.sha256).to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                daemon::render::table(
                    &["NAME", "ROLE", "SITE", "CREATED", "EXPIRES", "SHA256"],
                    rows
                )
            );
        }
        Command::Operator(OperatorCmd::Token(OperatorTokenCmd::Revoke { dir, name })) => {
            let n = cloud_anchor::tokens::revoke(&dir.data_dir, &name)?;
            println!("revoked {n} token(s) of {name}");
        }
        Command::Anchor(AnchorCmd::ReplicaInit { dir, seed }) => {
            cloud_anchor::replica::init(&dir.data_dir, &seed)?;
            println!(
                "{} is an anchor replica's data dir; start it with `shoal anchor run`",
                dir.data_dir.display()
            );
        }
        Command::Anchor(AnchorCmd::ReplicaSeed { dir, out }) => {
            cloud_anchor::replica::seed(&dir.data_dir, &out)?;
            println!(
                "replica seed written to {} (it holds the root key: keep it secret)",
                out.display()
            );
        }
        Command::DemoApp => node::demo_app::run()?,
        Command::Device(DeviceCmd::Read {
            node,
            identity,
            device,
            resource,
            since,
            json,
            follow,
        }) => {
            if follow {
                return node::device_cli::follow(&node, &identity, device.as_deref());
            }
            let since = since
                .as_deref()
                .map(parse_ttl)
                .transpose()?
                .map(|s| std::time::Duration::from_secs(s as u64));
            print!(
                "{}",
                node::device_cli::read(
                    &node,
                    &identity,
                    device.as_deref(),
                    resource.as_deref(),
                    since,
                    json
                )?
            );
        }
        Command::Device(DeviceCmd::Write {
            node,
            identity,
            device,
            resource,
            value,
            wait,
        }) => {
            let wait = std::time::Duration::from_secs(parse_ttl(&wait)? as u64);
            print!(
                "{}",
                node::device_cli::write(&node, &identity, &device, &resource, &value, wait)?
            );
        }
        Command::Fleet(FleetCmd::Token(TokenCmd::Create {
            dir,
            node,
            ttl,
            identity,
        })) => {
            // The grant is signed here, where the operator's key is; only
            // the grant goes to the anchor.
            let labels = node.labels()?;
            let site = node.site.clone().unwrap_or_else(|| node.node.clone());
            let grant = match &identity {
                Some(file) => Some(crdt_state::signed::identity::Grant::sign(
                    &crdt_state::Identity::read(file)?,
                    &node.node,
                    &site,
                    labels.clone(),
                    now(),
                )?),
                None => None,
            };
            let req = Verb::TokenCreate(daemon::enroll::TokenRequest {
                node: node.node.clone(),
                site: node.site.clone(),
                labels,
                ttl_s: parse_ttl(&ttl)?,
                grant,
            });
            verb(&dir.data_dir, None, req)?;
        }
        Command::Fleet(FleetCmd::Migrate {
            dir,
            out,
            sites,
            issuer_name,
        }) => {
            let m = daemon::enroll::migrate(&dir.data_dir, &out, &sites, &issuer_name, now())?;
            println!(
                "{}: the anchor now enrolls nodes of {} with issuer {} ({}); {} moved to {}: carry that directory off this host, and make enrollment tokens with --identity {}",
                dir.data_dir.display(),
                m.issuer.sites.join(", "),
                m.issuer.name,
                m.issuer.key.short(),
                m.moved.join(", "),
                out.display(),
                out.join("identity.json").display(),
            );
        }
        Command::Fleet(FleetCmd::TlsCert {
            dir,
            names,
            out_dir,
        }) => {
            // Read without the store: the anchor may be running on it.
            let root = crdt_state::local::datadir::root_public(&dir.data_dir)?;
            let (chain, key) = daemon::tls::issue_server_cert(&dir.data_dir, &root, &names, now())?;
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            std::fs::write(out_dir.join("tls.pem"), &chain)?;
            crdt_state::signed::identity::write_private(&out_dir.join("tls.key"), key.as_bytes())?;
            std::fs::copy(
                dir.data_dir.join(daemon::tls::CA_CERT_FILE),
                out_dir.join(daemon::tls::CA_CERT_FILE),
            )?;
            println!(
                "{}: tls.pem and tls.key for {} (valid {} days; run the anchor with --tls-cert and --tls-key), and tls-ca.pem for browsers and --ca",
                out_dir.display(),
                names.join(", "),
                daemon::tls::SERVER_CERT_DAYS
            );
            println!("pin: sha256//{}", daemon::tls::spki_pin(&chain)?);
        }
        Command::Fleet(FleetCmd::NodeBundle { dir, node, out }) => {
            let mut dd = DataDir::open(&dir.data_dir, None)?;
            daemon::enroll::node_bundle(
                &mut dd,
                &node.node,
                node.site.as_deref(),
                &node.labels()?,
                &out,
                now(),
            )?;
            println!(
                "node bundle for {} written to {} (it holds the node's secret key: carry it safely)",
                node.node,
                out.display()
            );
        }
        Command::Anchor(AnchorCmd::Run {
            dir,
            mesh,
            http,
            tls_cert,
            tls_key,
            insecure_http,
            readings_db,
            retention,
            failed_logins_per_minute,
            audit_retention,
        }) => {
            let duration = |r: Option<String>| -> anyhow::Result<Option<std::time::Duration>> {
                r.map(|r| Ok(std::time::Duration::from_secs(parse_ttl(&r)?.max(1) as u64)))
                    .transpose()
            };
            let retention = duration(retention)?;
            let audit_retention = duration(audit_retention)?;
            let tls = match (&http, tls_cert, tls_key) {
                (Some(_), Some(cert), Some(key)) => Some(
                    daemon::tls::Credentials::read(&cert, &key)?
                        .server_config()
                        .with_context(|| format!("{} and {}", cert.display(), key.display()))?,
                ),
                (Some(addr), _, _) if !insecure_http => anyhow::bail!(
                    "--http {addr} needs --tls-cert and --tls-key (from your CA, or `shoal fleet tls-cert`), or --insecure-http to serve plain HTTP"
                ),
                _ => None,
            };
            run_daemon(
                dir,
                &mesh,
                Daemon::Anchor {
                    http,
                    tls,
                    readings_db,
                    retention,
                    failed_logins_per_minute,
                    audit_retention,
                },
            )?
        }
        Command::Node(NodeCmd::Run {
            dir,
            mesh,
            site_api,
            site_api_insecure_http,
            runtime,
            kubeconfig,
            readings_cap,
            summary_interval,
        }) => {
            let rt = match runtime.as_str() {
                "native" => RuntimeChoice::Native,
                "kube" => RuntimeChoice::Kube { kubeconfig },
                other => anyhow::bail!("unknown runtime {other:?}: expected native or kube"),
            };
            run_daemon(
                dir,
                &mesh,
                Daemon::Node {
                    site_api,
                    site_api_tls: !site_api_insecure_http,
                    runtime: rt,
                    readings_cap,
                    summary_ms: summary_interval.saturating_mul(1000),
                },
            )?
        }
        Command::Site(SiteCmd::Apply {
            node,
            identity,
            files,
            output,
        }) => {
            let mut manifests = Vec::new();
            for f in &files {
                let (label, text) = read_input(f)?;
                manifests.extend(manifest::parse(&label, &text)?);
            }
            let applied = node::site_api::apply(&node, &identity, &manifests)?;
            print!("{}", daemon::render::applied(output, &applied));
        }
        Command::Site(SiteCmd::Get {
            node,
            identity,
            output,
        }) => {
            let client = node::site_api::Client::new(&node, crdt_state::Identity::read(&identity)?);
            let view = client.get("/api/view")?;
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&view)?),
                _ => print!("{}", as_yaml(&view)),
            }
        }
        Command::Node(NodeCmd::Enroll { dir, token, bundle }) => {
            let cert = match (token, bundle) {
                (_, Some(b)) => daemon::enroll::enroll_with_bundle(&dir.data_dir, &b)?,
                (Some(t), None) => {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?;
                    rt.block_on(daemon::enroll::enroll_with_token(&dir.data_dir, &t))?
                }
                (None, None) => anyhow::bail!("pass --token or --bundle"),
            };
            println!(
                "enrolled as node {} of site {} (fleet {})",
                cert.name,
                cert.site.as_deref().unwrap_or("-"),
                cert.root().short()
            );
        }
        Command::Identity(IdentityCmd::Create {
            dir,
            role,
            sites,
            name,
            out,
        }) => {
            let mut dd = DataDir::open(&dir.data_dir, None)?;
            let id = if role == Role::Issuer {
                dd.create_issuer(&name, &sites, now())?
            } else {
                if sites.len() > 1 {
                    anyhow::bail!("a {role} has one site; only an issuer names several");
                }
                dd.create_identity(role, sites.first().map(String::as_str), &name, now())?
            };
            id.write(&out)?;
            println!("identity {name} ({role}) written to {}", out.display());
        }
        Command::Identity(IdentityCmd::Use { dir, file }) => {
            let dd = DataDir::use_identity(&dir.data_dir, &file)?;
            let cert = dd.identity().map(|i| i.cert.clone()).context("identity")?;
            println!(
                "{} now writes as {} ({}) of fleet {}",
                dir.data_dir.display(),
                cert.name,
                cert.role,
                cert.root().short()
            );
        }
        Command::Identity(IdentityCmd::Revoke {
            target,
            identity,
            who,
            reason,
        }) => match target.client()? {
            Some(c) => {
                let identity = identity.context(
                    "--anchor needs --identity: the revocation is signed here, with your key",
                )?;
                print!("{}", c.revoke_signed(&identity, &who, &reason)?);
            }
            None => {
                verb(
                    target.dir()?,
                    identity.as_deref(),
                    Verb::Revoke { who, reason },
                )?;
            }
        },
        Command::Identity(IdentityCmd::Invite {
            anchor,
            role,
            site,
            name,
            ttl,
        }) => {
            let v = anchor.client()?.invite(
                &name,
                &role.to_string(),
                site.as_deref(),
                Some(parse_ttl(&ttl)?),
            )?;
            println!("{}", v["code"].as_str().unwrap_or_default());
            eprintln!(
                "{name} enters this code once, on the web UI's Keys page, within {ttl}; then approve the key their browser shows with `shoal identity approve --name {name} --fingerprint …` (an anchor that holds the fleet root certifies it at once)"
            );
        }
        Command::Identity(IdentityCmd::Approve {
            dir,
            anchor,
            name,
            fingerprint,
        }) => {
            let client = anchor.client()?;
            let waiting: Vec<serde_json::Value> = client
                .keys()?
                .into_iter()
                .filter(|i| i["name"] == name.as_str() && i["state"] == "pending")
                .collect();
            let [invite] = waiting.as_slice() else {
                anyhow::bail!(
                    "{} browser keys of {name} wait for a certificate (expected one): {}",
                    waiting.len(),
                    "invite them with `shoal identity invite`, and have them enter the code in the web UI"
                );
            };
            let key = crdt_state::PublicKey::from_hex(invite["key"].as_str().unwrap_or_default())?;
            if !cloud_anchor::keys::fingerprint_matches(&key, &fingerprint) {
                anyhow::bail!(
                    "the key waiting for {name} is {}, not the {fingerprint} you were told: do not approve it (ask them to enroll again)",
                    cloud_anchor::keys::fingerprint(&key)
                );
            }
            let role: Role = invite["role"].as_str().unwrap_or_default().parse()?;
            let dd = DataDir::open(&dir.data_dir, None)?;
            let cert = dd.issue(key, role, invite["site"].as_str(), &name, now())?;
            client.post_certificate(&cert)?;
            println!(
                "browser key {} of {name} ({role}) certified by the fleet root",
                cloud_anchor::keys::fingerprint(&key)
            );
        }
        Command::Identity(IdentityCmd::Show { dir }) => {
            let dd = DataDir::open(&dir.data_dir, None)?;
            let cert = dd
                .identity()
                .map(|i| i.cert.clone())
                .context("this data dir has no identity")?;
            println!("{}", serde_json::to_string_pretty(&cert)?);
        }
        Command::Bundle(BundleCmd::Export { dir, out }) => {
            let reply = verb(&dir.data_dir, None, Verb::Export { only: None })?;
            let bytes = hex::decode(reply.data.unwrap_or_default())
                .map_err(|_| anyhow::anyhow!("bundle bytes damaged in transit"))?;
            std::fs::write(&out, &bytes).with_context(|| format!("{}", out.display()))?;
            println!(
                "bundle of {} bytes written to {}",
                bytes.len(),
                out.display()
            );
        }
        Command::Store(StoreCmd::Check { dir }) => {
            let path = dir.data_dir.join(crdt_state::local::datadir::STORE_FILE);
            if crdt_state::Store::check(&path)? {
                println!("{}: intact", path.display());
            } else {
                println!("{}: was damaged and has been repaired", path.display());
            }
        }
        Command::Sim(SimCmd::Run {
            file,
            seed,
            out,
            plot,
        }) => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            let started = std::time::Instant::now();
            let mut shown = 0;
            let report = simulations::sim::run_scenario(&text, seed, |f| {
                let pct = (f * 100.0) as usize;
                if pct >= shown + 10 {
                    shown = pct;
                    eprint!("\r{} {pct:>3}%", "#".repeat(pct / 5));
                }
            })
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            eprintln!(
                "\r{} 100% in {:.1}s wall",
                "#".repeat(20),
                started.elapsed().as_secs_f64()
            );
            let json = serde_json::to_string_pretty(&report)?;
            match out {
                Some(p) => {
                    std::fs::write(&p, json + "\n").with_context(|| format!("{}", p.display()))?
                }
                None => println!("{json}"),
            }
            if let Some(p) = plot {
                std::fs::write(&p, report.plot_svg())
                    .with_context(|| format!("{}", p.display()))?;
            }
            for h in &report.heals {
                eprintln!(
                    "heal at {:.0}s: converged after {:.1} ms",
                    h.at_s, h.converged_after_ms
                );
            }
            if !report.passed() {
                anyhow::bail!(
                    "scenario {} failed (replay with --seed {}): {:?}",
                    report.name,
                    report.seed,
                    report.invariants
                );
            }
        }
        Command::Demo { dir, http, tour } => {
            if tour {
                let dir = match dir {
                    Some(d) => d,
                    None => std::env::temp_dir().join(format!("shoal-tour-{}", std::process::id())),
                };
                let mut out = std::io::stdout();
                simulations::tour::run(&dir, &mut out)?;
            } else {
                demo::run(dir, http)?;
            }
        }
        Command::Artifact(ArtifactCmd::Push {
            dir,
            file,
            name,
            media_type,
            description,
            identity,
        }) => {
            let p = daemon::artifact::Push {
                name,
                media_type,
                description,
            };
            print!(
                "{}",
                daemon::artifact::push(&dir.data_dir, identity.as_deref(), &file, &p)?
            );
        }
        Command::Data(DataCmd::Read {
            anchor,
            node,
            series,
            since,
            step,
            output,
        }) => {
            let to = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            let from = to.saturating_sub(parse_ttl(&since)? as u64 * 1000);
            let step = match step {
                Some(s) => parse_ttl(&s)? as u64 * 1000,
                None => 0,
            };
            let client = anchor.client()?;
            print!(
                "{}",
                client.series(&node, &series, (from, to), step, &output)?
            );
        }
        Command::Artifact(ArtifactCmd::Import { dir, file, name }) => {
            print!("{}", daemon::artifact::import(&dir.data_dir, &file, &name)?);
        }
        Command::Bundle(BundleCmd::Import { dir, file }) => {
            let bytes = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
            verb(
                &dir.data_dir,
                None,
                Verb::Import {
                    bundle: bytes,
                    output: Some("table".into()),
                },
            )?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    crdt_state::panics::install_hook();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
