//! Enrollment: how a node gets its certificate.
//!
//! Online: the operator makes a one-time token on the anchor's data dir
//! (`shoal fleet token create`). The token carries a 256-bit secret, the
//! anchor's addresses and peer id, and the fleet root; the anchor keeps
//! only the secret's SHA-256 with the node's name, site, labels and expiry
//! (`tokens.json`, owner-only). The node generates its key locally and
//! sends the secret and its public key on `/shoal/enroll/1`; the anchor
//! checks the token, marks it used, certifies the key and adds the Node to
//! the fleet document. The node's secret key never leaves it.
//!
//! With an issuer (ADR 0013): the token's record also holds a grant — the
//! node's name, site and labels signed by the operator who made the token
//! — and an anchor whose data dir holds `issuer.json` instead of the root
//! key certifies the node's key with the issuer against that grant. The
//! certificate carries both, so every peer checks it with the root alone.
//!
//! Offline: `shoal fleet node-bundle` makes the key, certificate and an
//! offline bundle of the node's documents on the operator's machine; the
//! file is carried to the air-gapped site (`shoal node enroll --bundle`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use crdt_state::signed::identity::{generate_key, write_private};
use crdt_state::{Certificate, DataDir, DocId, Identity, PublicKey, Role};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where an anchor keeps its outstanding tokens.
pub const TOKENS_FILE: &str = "tokens.json";
/// Where a daemon writes the addresses it listens on (with its peer id).
pub const ADDRS_FILE: &str = "addrs.json";
/// Where a node keeps the peers it should stay connected to.
pub const PEERS_FILE: &str = "peers.json";
/// The anchor's own identity in its data dir.
pub const ANCHOR_IDENTITY_FILE: &str = "anchor.json";
/// An issuer's identity in an anchor's data dir (ADR 0013): with it the
/// anchor certifies nodes of the issuer's sites against operators' grants,
/// without the fleet root key.
pub const ISSUER_FILE: &str = "issuer.json";

const TOKEN_PREFIX: &str = "shoal1-";

/// What a token carries (hex-encoded JSON after `shoal1-`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// The one-time secret (64 hex digits).
    pub secret: String,
    /// The anchor's addresses, each ending in `/p2p/<id>`.
    pub anchors: Vec<String>,
    /// The fleet root key.
    pub fleet: PublicKey,
}

impl Token {
    /// The token text.
    pub fn encode(&self) -> String {
        format!(
            "{TOKEN_PREFIX}{}",
            hex::encode(serde_json::to_vec(self).unwrap_or_default())
        )
    }

    /// Parses a token text.
    pub fn decode(text: &str) -> anyhow::Result<Token> {
        let body = text.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            anyhow!("not a Shoal enrollment token (it must start {TOKEN_PREFIX})")
        })?;
        if body.len() > 16 << 10 {
            bail!("enrollment token is too long");
        }
        let bytes = hex::decode(body).map_err(|_| anyhow!("enrollment token is damaged"))?;
        serde_json::from_slice(&bytes).map_err(|e| anyhow!("enrollment token is damaged: {e}"))
    }
}

/// An outstanding token, as the anchor keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The node it enrolls.
    pub node: String,
    /// Its site.
    pub site: String,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Expiry (Unix seconds).
    pub expires_at: i64,
    /// Used already (one-time).
    #[serde(default)]
    pub used: bool,
    /// The operator's grant for this node, which an issuer certifies
    /// against (absent in tokens made before issuers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<crdt_state::signed::identity::Grant>,
}

fn read_tokens(dir: &Path) -> anyhow::Result<BTreeMap<String, TokenRecord>> {
    let path = dir.join(TOKENS_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("{}", path.display())),
    }
}

fn write_tokens(dir: &Path, tokens: &BTreeMap<String, TokenRecord>) -> anyhow::Result<()> {
    let text = serde_json::to_vec_pretty(tokens)?;
    write_private(&dir.join(TOKENS_FILE), &text)?;
    Ok(())
}

fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The addresses a daemon last listened on (empty if it never ran).
pub fn read_addrs(dir: &Path) -> Vec<String> {
    std::fs::read(dir.join(ADDRS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The peers a node keeps connected to.
pub fn read_peers(dir: &Path) -> Vec<String> {
    std::fs::read(dir.join(PEERS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes the peers file.
pub fn write_peers(dir: &Path, peers: &[String]) -> anyhow::Result<()> {
    let path = dir.join(PEERS_FILE);
    std::fs::write(&path, serde_json::to_vec_pretty(peers)?)
        .with_context(|| format!("{}", path.display()))
}

/// What the operator asks for in a token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRequest {
    /// The node's name.
    pub node: String,
    /// Its site (default: the node's name).
    pub site: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Lifetime in seconds.
    pub ttl_s: i64,
    /// The operator's grant for the node, signed where the operator's key
    /// is (`shoal fleet token create --identity`); made with the data
    /// dir's own operator identity when absent and it has one.
    #[serde(default)]
    pub grant: Option<crdt_state::signed::identity::Grant>,
}

/// Creates a one-time token on an anchor's data dir. `anchors` are the
/// anchor's addresses (from the running daemon, or [`ADDRS_FILE`]).
pub fn create_token(
    dir: &Path,
    root: &PublicKey,
    anchors: Vec<String>,
    req: &TokenRequest,
    grantor: Option<&Identity>,
    now: i64,
) -> anyhow::Result<String> {
    crdt_state::fleet::model::validate_name("node", &req.node).map_err(|e| anyhow!(e))?;
    let site = req.site.clone().unwrap_or_else(|| req.node.clone());
    crdt_state::fleet::model::validate_name("site", &site).map_err(|e| anyhow!(e))?;
    if anchors.is_empty() {
        bail!(
            "no anchor address known for {}: start `shoal anchor run` on it first",
            dir.display()
        );
    }
    if req.ttl_s <= 0 {
        bail!("token lifetime must be positive");
    }
    let grant = match (&req.grant, grantor) {
        (Some(g), _) => {
            g.verify(root)?;
            if g.node != req.node || g.site != site || g.labels != req.labels {
                bail!(
                    "the grant is for {} of site {}, not for this token's node",
                    g.node,
                    g.site
                );
            }
            Some(g.clone())
        }
        (None, Some(op)) if op.cert.role == crdt_state::Role::Operator => {
            Some(crdt_state::signed::identity::Grant::sign(
                op,
                &req.node,
                &site,
                req.labels.clone(),
                now,
            )?)
        }
        (None, _) if dir.join(ISSUER_FILE).exists() => bail!(
            "this anchor certifies nodes with an issuer: a token needs an operator's grant (--identity FILE of an operator)"
        ),
        (None, _) => None,
    };
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow!("no randomness from the OS: {e}"))?;
    let secret = hex::encode(secret);
    let _guard = tokens_lock();
    let mut tokens = read_tokens(dir)?;
    tokens.retain(|_, t| !t.used && t.expires_at > now);
    tokens.insert(
        digest(&secret),
        TokenRecord {
            node: req.node.clone(),
            site,
            labels: req.labels.clone(),
            expires_at: now + req.ttl_s,
            used: false,
            grant,
        },
    );
    write_tokens(dir, &tokens)?;
    Ok(Token {
        secret,
        anchors,
        fleet: *root,
    }
    .encode())
}

/// The enrollment request a node sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The token's secret.
    pub secret: String,
    /// The node's freshly generated public key.
    pub key: PublicKey,
}

/// The anchor's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum EnrollResponse {
    /// Enrolled: the node's certificate.
    Certified(Certificate),
    /// Refused, and why.
    Refused(String),
}

/// An enrollment the anchor accepted: the node's certificate and the Node
/// entity, for the daemon to write through its one write path. Its token is
/// already spent ([`spend`]).
#[derive(Debug)]
pub struct Enrollment {
    /// The node's certificate, signed with the fleet root key.
    pub cert: Certificate,
    /// The Node entity (name, site, labels) for the fleet document.
    pub node: crdt_state::fleet::manifest::Manifest,
}

/// Serialises reads and writes of the tokens file within a process (the
/// daemon spends tokens on blocking threads, and creates them).
static TOKENS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tokens_lock() -> std::sync::MutexGuard<'static, ()> {
    TOKENS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Checks an enrollment request against the anchor's tokens, marks its
/// token used (written and synced), and signs the node's certificate with
/// the root key of the data dir at `dir` (fleet `root`). Reads and writes
/// files: a running daemon calls it on a blocking thread. The token is
/// spent before the certificate is written anywhere: if that write then
/// fails, the node needs a new token, but no token ever serves twice.
pub fn spend(dir: &Path, root: &PublicKey, bytes: &[u8], now: i64) -> anyhow::Result<Enrollment> {
    let req: EnrollRequest =
        serde_json::from_slice(bytes).map_err(|e| anyhow!("malformed enrollment request: {e}"))?;
    let _guard = tokens_lock();
    let mut tokens = read_tokens(dir)?;
    let token = digest(&req.secret);
    let record = tokens
        .get_mut(&token)
        .ok_or_else(|| anyhow!("unknown enrollment token"))?;
    if record.used {
        bail!("enrollment token was already used");
    }
    if record.expires_at <= now {
        bail!("enrollment token expired");
    }
    let node = node_manifest(&record.node, &record.site, &record.labels)?;
    let issuer_file = dir.join(ISSUER_FILE);
    let cert = if issuer_file.exists() {
        // Without the root: the issuer certifies what the operator granted.
        let issuer = Identity::read(&issuer_file)?;
        let grant = record
            .grant
            .clone()
            .ok_or_else(|| anyhow!("the token carries no operator's grant: make a new one"))?;
        let cert = Certificate::issue_via(&issuer, req.key, grant, now)?;
        cert.verify(root)?;
        cert
    } else {
        crdt_state::local::datadir::issue_in(
            dir,
            root,
            req.key,
            Role::Node,
            Some(&record.site),
            &record.node,
            now,
        )?
    };
    record.used = true;
    write_tokens(dir, &tokens)?;
    Ok(Enrollment { cert, node })
}

fn node_manifest(
    name: &str,
    site: &str,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<crdt_state::fleet::manifest::Manifest> {
    let spec = serde_json::json!({
        "apiVersion": "shoal.dev/v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"site": site, "labels": labels},
    });
    let mut ms = crdt_state::fleet::manifest::parse("enrollment", &spec.to_string())?;
    ms.pop()
        .ok_or_else(|| anyhow!("enrollment made no Node manifest"))
}

/// Sets up a node's data dir from a certificate and its key.
fn install(dir: &Path, identity: &Identity, anchors: &[String]) -> anyhow::Result<DataDir> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let tmp = dir.join(".identity.tmp");
    identity.write(&tmp)?;
    let dd = DataDir::use_identity(dir, &tmp);
    let _ = std::fs::remove_file(&tmp);
    let dd = dd?;
    write_peers(dir, anchors)?;
    Ok(dd)
}

/// An anchor's own identity ([`ANCHOR_IDENTITY_FILE`]): made, and
/// certified with the root key, the first time an anchor runs on a data
/// dir (or is migrated); read after that.
pub fn anchor_identity(dd: &mut DataDir, now: i64) -> anyhow::Result<Identity> {
    let path = dd.path().join(ANCHOR_IDENTITY_FILE);
    if path.exists() {
        return Ok(Identity::read(&path)?);
    }
    let mut suffix = [0u8; 4];
    getrandom::fill(&mut suffix).map_err(|e| anyhow!("no randomness from the OS: {e}"))?;
    let name = format!("anchor-{}", hex::encode(suffix));
    let id = dd.create_identity(Role::Anchor, None, &name, now).context(
        "an anchor runs on the data dir made by `shoal fleet init` (it needs the root key)",
    )?;
    id.write(&path)?;
    Ok(id)
}

/// What `shoal fleet migrate` did.
#[derive(Debug)]
pub struct Migrated {
    /// The issuer the anchor now enrolls with.
    pub issuer: Certificate,
    /// Files moved out of the anchor's data dir (now in the operator's copy).
    pub moved: Vec<String>,
}

/// Takes the fleet root and the operator identity off a stopped anchor's
/// data dir `anchor` (ADR 0013): they go to `out`, a new data dir for the
/// operator's machine (the store, the root key, the operator identity, the
/// TLS CA), where an issuer for `sites` (every site a node is registered
/// at, when empty) is made; its certificate reaches the anchor's fleet
/// document, `issuer.json` its data dir, and the root key, the operator
/// identity and the TLS CA's key leave it.
pub fn migrate(
    anchor: &Path,
    out: &Path,
    sites: &[String],
    issuer_name: &str,
    now: i64,
) -> anyhow::Result<Migrated> {
    use crdt_state::local::datadir::{IDENTITY_FILE, ROOT_KEY_FILE, STORE_FILE};
    for f in [ROOT_KEY_FILE, IDENTITY_FILE] {
        if !anchor.join(f).exists() {
            bail!(
                "{} has no {f}: it was migrated already, or is not the data dir `shoal fleet init` made",
                anchor.display()
            );
        }
    }
    if anchor.join(ISSUER_FILE).exists() {
        bail!("{} holds an issuer already", anchor.display());
    }
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} is not empty: give a new directory", out.display());
    }
    // The anchor must be stopped: its store is opened here (and refused
    // while a daemon holds it).
    let mut here = DataDir::open(anchor, None)?;
    let sites: Vec<String> = if sites.is_empty() {
        let mut all: Vec<String> = here
            .fleet()?
            .nodes
            .values()
            .map(|n| n.site.clone())
            .collect();
        all.sort();
        all.dedup();
        if all.is_empty() {
            bail!("no node is registered yet: name the issuer's sites (--site)");
        }
        all
    } else {
        sites.to_vec()
    };
    // An anchor that never ran has no anchor key yet, and could not make
    // one without the root: made now.
    anchor_identity(&mut here, now)?;
    std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
    let tls_ca = [crate::tls::CA_CERT_FILE, crate::tls::CA_KEY_FILE];
    for f in [STORE_FILE, ROOT_KEY_FILE, IDENTITY_FILE]
        .into_iter()
        .chain(tls_ca)
    {
        let from = anchor.join(f);
        if from.exists() {
            std::fs::copy(&from, out.join(f))
                .with_context(|| format!("copying {} to {}", from.display(), out.display()))?;
        }
    }
    let issuer = {
        let mut root_side = DataDir::open(out, None)?;
        let issuer = root_side.create_issuer(issuer_name, &sites, now)?;
        let bundle = root_side.export_some(|id| *id == DocId::Fleet)?;
        here.import(&bundle)?;
        issuer
    };
    issuer.write(&anchor.join(ISSUER_FILE))?;
    drop(here);
    let mut moved = Vec::new();
    for f in [ROOT_KEY_FILE, IDENTITY_FILE, crate::tls::CA_KEY_FILE] {
        let p = anchor.join(f);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            moved.push(f.to_string());
        }
    }
    Ok(Migrated {
        issuer: issuer.cert,
        moved,
    })
}

/// Enrolls a node with a token over the network: generates the key here,
/// asks the anchor(s) named in the token, and sets up the data dir.
pub async fn enroll_with_token(dir: &Path, token: &str) -> anyhow::Result<Certificate> {
    if dir.join(crdt_state::local::datadir::IDENTITY_FILE).exists() {
        bail!("{} already holds an identity", dir.display());
    }
    let token = Token::decode(token)?;
    let secret = generate_key()?;
    let key = PublicKey(secret.verifying_key().to_bytes());
    let (mesh, _events) = mesh::Mesh::start(mesh::Config::new(secret.to_bytes()), Vec::new())
        .map_err(|e| anyhow!("{e}"))?;
    let req = serde_json::to_vec(&EnrollRequest {
        secret: token.secret.clone(),
        key,
    })?;
    let mut errors = Vec::new();
    for addr in &token.anchors {
        let Ok(ma) = addr.parse::<mesh::Multiaddr>() else {
            errors.push(format!("{addr}: not an address"));
            continue;
        };
        match mesh.request(ma, mesh::ENROLL, req.clone()).await {
            Ok(bytes) => match serde_json::from_slice::<EnrollResponse>(&bytes) {
                Ok(EnrollResponse::Certified(cert)) => {
                    if cert.key != key || cert.root() != token.fleet {
                        bail!("the anchor answered with a certificate for another key or fleet");
                    }
                    cert.verify(&token.fleet)?;
                    let identity = Identity::new(cert.clone(), secret)?;
                    install(dir, &identity, &token.anchors)?;
                    return Ok(cert);
                }
                Ok(EnrollResponse::Refused(why)) => bail!("the anchor refused: {why}"),
                Err(e) => errors.push(format!("{addr}: malformed answer: {e}")),
            },
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    bail!("could not reach an anchor: {}", errors.join("; "))
}

/// What `shoal fleet node-bundle` writes.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeBundle {
    certificate: Certificate,
    secret_key: String,
    anchors: Vec<String>,
    bundle: String,
}

/// Makes an offline enrollment file for `node` on the operator's data dir:
/// a key and certificate, the Node entry, and a bundle of the documents the
/// node keeps. The file holds a secret key: it is written owner-only.
pub fn node_bundle(
    dd: &mut DataDir,
    node: &str,
    site: Option<&str>,
    labels: &BTreeMap<String, String>,
    out: &Path,
    now: i64,
) -> anyhow::Result<PathBuf> {
    crdt_state::fleet::model::validate_name("node", node).map_err(|e| anyhow!(e))?;
    let site = site.unwrap_or(node).to_string();
    dd.apply(&[node_manifest(node, &site, labels)?], now)?;
    let secret = generate_key()?;
    let key = PublicKey(secret.verifying_key().to_bytes());
    let cert = dd.certify(key, Role::Node, Some(&site), node, now)?;
    let site_doc = DocId::Site(site.clone());
    let bundle =
        dd.export_some(|id| *id == DocId::Fleet || *id == site_doc || node_doc_of(id, node))?;
    let file = NodeBundle {
        certificate: cert,
        secret_key: hex::encode(secret.to_bytes()),
        anchors: read_addrs(dd.path()),
        bundle: hex::encode(bundle),
    };
    write_private(out, &serde_json::to_vec(&file)?)?;
    Ok(out.to_path_buf())
}

fn node_doc_of(id: &DocId, node: &str) -> bool {
    matches!(id, DocId::Node { name, .. } if name == node)
}

/// Sets up a node's data dir from an offline enrollment file.
pub fn enroll_with_bundle(dir: &Path, file: &Path) -> anyhow::Result<Certificate> {
    if dir.join(crdt_state::local::datadir::IDENTITY_FILE).exists() {
        bail!("{} already holds an identity", dir.display());
    }
    let bytes = std::fs::read(file).with_context(|| format!("{}", file.display()))?;
    let nb: NodeBundle = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("{} is not a node bundle: {e}", file.display()))?;
    let secret = crdt_state::signed::identity::parse_secret(&nb.secret_key)
        .map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let identity = Identity::new(nb.certificate.clone(), secret)?;
    let mut dd = install(dir, &identity, &nb.anchors)?;
    let bundle =
        hex::decode(&nb.bundle).map_err(|_| anyhow!("{}: damaged bundle", file.display()))?;
    dd.import(&bundle)?;
    Ok(nb.certificate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(secret: &str) -> Vec<u8> {
        let key = generate_key().expect("key");
        serde_json::to_vec(&EnrollRequest {
            secret: secret.into(),
            key: PublicKey(key.verifying_key().to_bytes()),
        })
        .expect("json")
    }

    /// A token for node n1 made at time 100, and its secret.
    fn secret_of(dir: &Path, root: &PublicKey, site: Option<&str>, ttl_s: i64) -> String {
        let req = TokenRequest {
            node: "n1".into(),
            site: site.map(str::to_string),
            labels: BTreeMap::new(),
            ttl_s,
            grant: None,
        };
        let anchors = vec!["/ip4/127.0.0.1/udp/1/quic-v1".into()];
        let token = create_token(dir, root, anchors, &req, None, 100).expect("token");
        Token::decode(&token).expect("decode").secret
    }

    /// An anchor data dir with an issuer and no root key enrolls a node of
    /// the issuer's sites against an operator's grant; the certificate
    /// checks with the root alone. A token without a grant cannot be made
    /// there, and a grant for a site the issuer does not cover is spent in
    /// vain.
    #[test]
    fn an_issuer_enrolls_without_the_root_key() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root_dir = tmp.path().join("operator");
        let mut dd = DataDir::init(&root_dir, "f", 100).expect("init");
        let root = dd.trust().root();
        let issuer = dd
            .create_issuer("north-issuer", &["s1".to_string()], 100)
            .expect("issuer");
        let alice = dd.identity().cloned().expect("the operator identity");
        // The anchor's data dir: the issuer, and no root key.
        let anchor = tmp.path().join("anchor");
        std::fs::create_dir_all(&anchor).expect("dir");
        issuer.write(&anchor.join(ISSUER_FILE)).expect("write");
        let anchors = vec!["/ip4/127.0.0.1/udp/1/quic-v1".to_string()];
        let req = |node: &str, site: &str| TokenRequest {
            node: node.into(),
            site: Some(site.into()),
            labels: BTreeMap::from([("rack".to_string(), "r1".to_string())]),
            ttl_s: 60,
            grant: None,
        };
        let e = create_token(&anchor, &root, anchors.clone(), &req("n1", "s1"), None, 100)
            .expect_err("no grant");
        assert!(e.to_string().contains("grant"), "{e}");
        let token = create_token(
            &anchor,
            &root,
            anchors.clone(),
            &req("n1", "s1"),
            Some(&alice),
            100,
        )
        .expect("token");
        let secret = Token::decode(&token).expect("decode").secret;
        let e = spend(&anchor, &root, &request(&secret), 110).expect("enrolled");
        assert_eq!(e.cert.issuer, issuer.key());
        assert_eq!(e.cert.root(), root);
        e.cert.verify(&root).expect("checks with the root");
        assert_eq!(
            e.cert.grant.as_ref().map(|g| g.by.name.as_str()),
            Some(alice.cert.name.as_str())
        );
        // Site s2 is not the issuer's.
        let token = create_token(&anchor, &root, anchors, &req("n2", "s2"), Some(&alice), 100)
            .expect("token");
        let secret = Token::decode(&token).expect("decode").secret;
        let e = spend(&anchor, &root, &request(&secret), 110).expect_err("not its site");
        assert!(format!("{e:#}").contains("not of site s2"), "{e:#}");
    }

    /// A token serves one enrollment, even when two arrive at once on two
    /// threads; it is spent (on disk) before the certificate leaves.
    #[test]
    fn a_token_serves_once() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("anchor");
        let dd = DataDir::init(&dir, "f", 100).expect("init");
        let root = dd.trust().root();
        let secret = secret_of(&dir, &root, Some("s1"), 60);
        let results: Vec<_> = std::thread::scope(|s| {
            let a = s.spawn(|| spend(&dir, &root, &request(&secret), 110));
            let b = s.spawn(|| spend(&dir, &root, &request(&secret), 110));
            vec![a.join().expect("a"), b.join().expect("b")]
        });
        let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok.len(), 1, "exactly one enrollment: {results:?}");
        assert_eq!(ok[0].cert.name, "n1");
        assert_eq!(ok[0].cert.site.as_deref(), Some("s1"));
        ok[0].cert.verify(&root).expect("signed by the root");
        let refused = results
            .iter()
            .find_map(|r| r.as_ref().err())
            .expect("one refused");
        assert!(refused.to_string().contains("already used"), "{refused}");
        // Spent on disk: a later request (another process, a restart) too.
        let again = spend(&dir, &root, &request(&secret), 120).expect_err("spent");
        assert!(again.to_string().contains("already used"), "{again}");
    }

    #[test]
    fn bad_requests_are_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("anchor");
        let dd = DataDir::init(&dir, "f", 100).expect("init");
        let root = dd.trust().root();
        let e = spend(&dir, &root, b"\xff garbage", 100).expect_err("garbage");
        assert!(
            e.to_string().contains("malformed enrollment request"),
            "{e}"
        );
        let e = spend(&dir, &root, &request("nope"), 100).expect_err("unknown");
        assert!(e.to_string().contains("unknown enrollment token"), "{e}");
        let secret = secret_of(&dir, &root, None, 5);
        let e = spend(&dir, &root, &request(&secret), 105).expect_err("expired");
        assert!(e.to_string().contains("expired"), "{e}");
    }
}
