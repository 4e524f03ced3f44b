//! Keys, certificates and identities.
//!
//! A fleet has a root Ed25519 key. The root certifies every writer: a
//! [`Certificate`] binds a public key to a name, a [`Role`] and (for site
//! engineers and nodes) a site. Certificates carry no expiry: validity never
//! depends on a local clock (substations drift and lose NTP). Revocation is a
//! list in the fleet document.

use std::fmt;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Domain separator for certificate signatures.
const CERT_DOMAIN: &[u8] = b"shoal/cert/v1\0";

/// An Ed25519 public key, shown as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self> {
        let bytes = hex::decode(s.trim())
            .map_err(|e| Error::Identity(format!("public key {s:?} is not hex: {e}")))?;
        Self::from_slice(&bytes)
    }

    /// From raw bytes; must be 32 long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::Identity(format!("public key has {} bytes, expected 32", bytes.len()))
        })?;
        Ok(PublicKey(arr))
    }

    /// Short form for logs and tables (first 8 hex digits).
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// Checks that `signature` is this key's over `msg` (strict Ed25519).
    pub fn verify_signature(&self, msg: &[u8], signature: &[u8; 64]) -> Result<()> {
        self.verifying_key()?
            .verify_strict(msg, &Signature::from_bytes(signature))
            .map_err(|_| Error::Identity(format!("not a signature of {}", self.short())))
    }

    pub(crate) fn verifying_key(&self) -> Result<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0)
            .map_err(|_| Error::Identity(format!("{} is not a valid Ed25519 key", self.to_hex())))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PublicKey::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// What a certified key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Writes the fleet document and every site document.
    Operator,
    /// Writes the site document of its own site.
    SiteEngineer,
    /// An always-on cloud peer; in the fleet document writes only node
    /// certificates and registrations (enrollment) and rollout decision
    /// marks ([`Certificate::may_write_field`], ADR 0013).
    Anchor,
    /// An edge node; writes its own node document.
    Node,
    /// Certifies node keys for the sites it names, against grants operators
    /// signed (ADR 0013): what an anchor holds instead of the root key.
    /// Writes no document.
    Issuer,
}

impl Role {
    /// The name used on the command line and in files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::SiteEngineer => "site-engineer",
            Role::Anchor => "anchor",
            Role::Node => "node",
            Role::Issuer => "issuer",
        }
    }

    fn code(&self) -> u8 {
        match self {
            Role::Operator => 1,
            Role::SiteEngineer => 2,
            Role::Anchor => 3,
            Role::Node => 4,
            Role::Issuer => 5,
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "operator" => Role::Operator,
            "site-engineer" => Role::SiteEngineer,
            "anchor" => Role::Anchor,
            "node" => Role::Node,
            "issuer" => Role::Issuer,
            other => {
                return Err(Error::Identity(format!(
                    "unknown role {other:?}: expected operator, site-engineer, anchor, node or issuer"
                )));
            }
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Domain separator for grant signatures.
const GRANT_DOMAIN: &[u8] = b"shoal/grant/v1\0";

/// What an operator allows an issuer to certify: one node, of one site,
/// with these labels (ADR 0013). It travels in the enrollment token's
/// record and ends up in the node's certificate, with the operator's own
/// certificate, so anyone holding the fleet root can check it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The node's name.
    pub node: String,
    /// Its site.
    pub site: String,
    /// Its labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Seconds since the epoch when granted, for people only.
    pub granted_at: i64,
    /// The operator who granted it (a root-signed operator certificate).
    pub by: Box<Certificate>,
    /// The operator's signature, hex.
    pub signature: String,
}

impl Grant {
    /// A grant for `node` of `site`, signed by `operator`.
    pub fn sign(
        operator: &Identity,
        node: &str,
        site: &str,
        labels: std::collections::BTreeMap<String, String>,
        granted_at: i64,
    ) -> Result<Grant> {
        if operator.cert.role != Role::Operator {
            return Err(Error::Identity(format!(
                "{} is a {}: only an operator grants a node",
                operator.cert.name, operator.cert.role
            )));
        }
        let mut g = Grant {
            node: node.to_string(),
            site: site.to_string(),
            labels,
            granted_at,
            by: Box::new(operator.cert.clone()),
            signature: String::new(),
        };
        g.signature = hex::encode(operator.sign(&g.signed_bytes()));
        Ok(g)
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(GRANT_DOMAIN);
        out.extend_from_slice(&self.by.key.0);
        for s in [self.node.as_str(), self.site.as_str()] {
            push_str(&mut out, s);
        }
        out.extend_from_slice(&(self.labels.len() as u32).to_be_bytes());
        for (k, v) in &self.labels {
            push_str(&mut out, k);
            push_str(&mut out, v);
        }
        out.extend_from_slice(&self.granted_at.to_be_bytes());
        out
    }

    /// Checks that an operator of the fleet `root` signed it.
    pub fn verify(&self, root: &PublicKey) -> Result<()> {
        if self.by.role != Role::Operator || self.by.via.is_some() {
            return Err(Error::Identity(format!(
                "the grant of {} is signed by {} ({}), not by an operator",
                self.node, self.by.name, self.by.role
            )));
        }
        self.by.verify(root)?;
        let sig = parse_signature(&self.signature)
            .ok_or_else(|| Error::Identity(format!("the grant of {} is not signed", self.node)))?;
        self.by
            .key
            .verify_signature(&self.signed_bytes(), &sig)
            .map_err(|_| {
                Error::Identity(format!(
                    "the grant of {} has a bad signature of {}",
                    self.node, self.by.name
                ))
            })
    }
}

/// The fields of the fleet document an anchor writes itself: certificates
/// (each checks on its own), node registrations, and the decision marks of
/// a rollout (`rollouts.<app>.<open|halted|aborted|done|paused>.…`), never
/// a rollout's target or the spec it replaces.
fn anchor_field(key: &str) -> bool {
    if key.starts_with("certs.") || key.starts_with("nodes.") {
        return true;
    }
    let Some(rest) = key.strip_prefix("rollouts.") else {
        return false;
    };
    let mut parts = rest.splitn(3, '.');
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(app), Some("open" | "halted" | "aborted" | "done" | "paused"), Some(tail))
            if !app.is_empty() && !tail.is_empty()
    )
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn parse_signature(hex_sig: &str) -> Option<[u8; 64]> {
    hex::decode(hex_sig).ok().and_then(|b| b.try_into().ok())
}

/// A binding of a key to a name, role and site, signed by the fleet root
/// — or, for a node, by an issuer the root certified, against an
/// operator's grant (ADR 0013).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The certified key.
    pub key: PublicKey,
    /// Human name (operator login, node name).
    pub name: String,
    /// What the key may do.
    pub role: Role,
    /// The site, for site engineers and nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The sites an issuer may certify nodes of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// The key that signed this certificate: the fleet root, or the
    /// issuer of `via`.
    pub issuer: PublicKey,
    /// Seconds since the epoch at issue, for people only: never checked.
    pub issued_at: i64,
    /// For a node certified by an issuer: the operator's grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Box<Grant>>,
    /// For a node certified by an issuer: the issuer's own certificate,
    /// signed by the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Box<Certificate>>,
    /// The issuer's signature, hex.
    pub signature: String,
}

impl Certificate {
    /// Issues a certificate signed by `root`.
    pub fn issue(
        root: &SigningKey,
        key: PublicKey,
        name: &str,
        role: Role,
        site: Option<&str>,
        issued_at: i64,
    ) -> Result<Self> {
        crate::fleet::model::validate_name("name", name).map_err(Error::Identity)?;
        if let Some(site) = site {
            crate::fleet::model::validate_name("site", site).map_err(Error::Identity)?;
        }
        if matches!(role, Role::SiteEngineer | Role::Node) && site.is_none() {
            return Err(Error::Identity(format!(
                "a {role} certificate needs a site (--site)"
            )));
        }
        if role == Role::Issuer {
            return Err(Error::Identity(
                "an issuer certificate names its sites: use Certificate::issue_issuer".into(),
            ));
        }
        let mut cert = Certificate {
            key,
            name: name.to_string(),
            role,
            site: site.map(str::to_string),
            sites: Vec::new(),
            issuer: PublicKey(root.verifying_key().to_bytes()),
            issued_at,
            grant: None,
            via: None,
            signature: String::new(),
        };
        let sig = root.sign(&cert.signed_bytes());
        cert.signature = hex::encode(sig.to_bytes());
        Ok(cert)
    }

    /// Issues, with the root, an issuer's certificate for `sites`.
    pub fn issue_issuer(
        root: &SigningKey,
        key: PublicKey,
        name: &str,
        sites: &[String],
        issued_at: i64,
    ) -> Result<Self> {
        crate::fleet::model::validate_name("name", name).map_err(Error::Identity)?;
        if sites.is_empty() {
            return Err(Error::Identity(
                "an issuer certifies nodes of the sites it names: give at least one (--site)"
                    .into(),
            ));
        }
        for site in sites {
            crate::fleet::model::validate_name("site", site).map_err(Error::Identity)?;
        }
        let mut sites = sites.to_vec();
        sites.sort();
        sites.dedup();
        let mut cert = Certificate {
            key,
            name: name.to_string(),
            role: Role::Issuer,
            site: None,
            sites,
            issuer: PublicKey(root.verifying_key().to_bytes()),
            issued_at,
            grant: None,
            via: None,
            signature: String::new(),
        };
        cert.signature = hex::encode(root.sign(&cert.signed_bytes()).to_bytes());
        Ok(cert)
    }

    /// Issues, with an issuer's identity, a node's certificate for `key`
    /// against an operator's `grant` (its name, site and labels are the
    /// grant's).
    pub fn issue_via(
        issuer: &Identity,
        key: PublicKey,
        grant: Grant,
        issued_at: i64,
    ) -> Result<Self> {
        if issuer.cert.role != Role::Issuer {
            return Err(Error::Identity(format!(
                "{} is a {}, not an issuer",
                issuer.cert.name, issuer.cert.role
            )));
        }
        if !issuer.cert.sites.contains(&grant.site) {
            return Err(Error::Identity(format!(
                "issuer {} certifies nodes of {} only, not of site {}",
                issuer.cert.name,
                issuer.cert.sites.join(", "),
                grant.site
            )));
        }
        let mut cert = Certificate {
            key,
            name: grant.node.clone(),
            role: Role::Node,
            site: Some(grant.site.clone()),
            sites: Vec::new(),
            issuer: issuer.key(),
            issued_at,
            grant: Some(Box::new(grant)),
            via: Some(Box::new(issuer.cert.clone())),
            signature: String::new(),
        };
        cert.signature = hex::encode(issuer.sign(&cert.signed_bytes()));
        Ok(cert)
    }

    /// The fleet root this certificate hangs from.
    pub fn root(&self) -> PublicKey {
        self.via.as_ref().map_or(self.issuer, |v| v.issuer)
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(CERT_DOMAIN);
        out.extend_from_slice(&self.issuer.0);
        out.extend_from_slice(&self.key.0);
        out.push(self.role.code());
        for s in [self.name.as_str(), self.site.as_deref().unwrap_or("")] {
            push_str(&mut out, s);
        }
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        // Only in certificates that have them: older ones sign the same
        // bytes as before.
        if !self.sites.is_empty() {
            out.extend_from_slice(b"sites");
            out.extend_from_slice(&(self.sites.len() as u32).to_be_bytes());
            for s in &self.sites {
                push_str(&mut out, s);
            }
        }
        if let Some(g) = &self.grant {
            out.extend_from_slice(b"grant");
            push_str(&mut out, &g.signature);
        }
        out
    }

    /// Checks the certificate against the fleet root `root`: signed by the
    /// root, or a node's signed by an issuer the root certified for the
    /// node's site, against an operator's grant for this very node
    /// (ADR 0013). Nothing else follows a chain, and chains are never
    /// longer than one issuer.
    pub fn verify(&self, root: &PublicKey) -> Result<()> {
        if let Some(via) = &self.via {
            return self.verify_via(via, root);
        }
        if self.grant.is_some() {
            return Err(Error::Identity(format!(
                "certificate of {} carries a grant but no issuer",
                self.name
            )));
        }
        if self.issuer != *root {
            return Err(Error::Identity(format!(
                "certificate of {} was issued by {}, not by this fleet's root {}",
                self.name,
                self.issuer.short(),
                root.short()
            )));
        }
        let sig_bytes: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                Error::Identity(format!(
                    "certificate of {} has a malformed signature",
                    self.name
                ))
            })?;
        let vk = root.verifying_key()?;
        vk.verify(&self.signed_bytes(), &Signature::from_bytes(&sig_bytes))
            .map_err(|_| {
                Error::Identity(format!(
                    "certificate of {} ({}) has a bad root signature",
                    self.name,
                    self.key.short()
                ))
            })
    }

    fn verify_via(&self, via: &Certificate, root: &PublicKey) -> Result<()> {
        let refuse = |why: String| Error::Identity(format!("certificate of {}: {why}", self.name));
        if via.role != Role::Issuer || via.via.is_some() {
            return Err(refuse(format!(
                "signed by {} ({}), which is not an issuer the root certified",
                via.name, via.role
            )));
        }
        via.verify(root)?;
        if via.key != self.issuer {
            return Err(refuse(format!(
                "not signed by the issuer {} it names",
                via.name
            )));
        }
        if self.role != Role::Node {
            return Err(refuse(format!(
                "an issuer certifies nodes only, not a {}",
                self.role
            )));
        }
        let site = self.site.as_deref().unwrap_or_default();
        if !via.sites.iter().any(|s| s == site) {
            return Err(refuse(format!(
                "issuer {} certifies nodes of {} only, not of site {site}",
                via.name,
                via.sites.join(", ")
            )));
        }
        let grant = self
            .grant
            .as_ref()
            .ok_or_else(|| refuse("no operator's grant".into()))?;
        grant.verify(root)?;
        if grant.node != self.name || grant.site != site {
            return Err(refuse(format!(
                "the grant is for {} of site {}",
                grant.node, grant.site
            )));
        }
        let sig = parse_signature(&self.signature)
            .ok_or_else(|| refuse("a malformed signature".into()))?;
        self.issuer
            .verify_signature(&self.signed_bytes(), &sig)
            .map_err(|_| refuse(format!("a bad signature of issuer {}", via.name)))
    }

    /// Whether this certificate lets its key write field `key` of `doc`:
    /// [`Certificate::may_write`], and for an anchor, in the fleet
    /// document, only what it writes on its own — node certificates and
    /// registrations, and rollout decisions (ADR 0013). An anchor writes no
    /// app, config, device, artifact, revocation, site override or
    /// rollout target: what runs is what operators signed.
    pub fn may_write_field(&self, doc: &crate::signed::doc::DocId, key: &str) -> bool {
        if !self.may_write(doc) {
            return false;
        }
        match self.role {
            Role::Anchor => anchor_field(key),
            _ => true,
        }
    }

    /// Whether this certificate lets its key write document `doc`.
    pub fn may_write(&self, doc: &crate::signed::doc::DocId) -> bool {
        use crate::signed::doc::DocId;
        match (doc, self.role) {
            (DocId::Fleet, Role::Operator | Role::Anchor) => true,
            (DocId::Site(_), Role::Operator) => true,
            (DocId::Site(s), Role::SiteEngineer) => self.site.as_deref() == Some(s.as_str()),
            (DocId::Node { name, .. }, Role::Node) => *name == self.name,
            _ => false,
        }
    }

    /// Compact JSON form, as stored in the fleet document and bundles.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses the JSON form (does not verify it).
    pub fn from_json(s: &[u8]) -> Result<Self> {
        serde_json::from_slice(s)
            .map_err(|e| Error::Identity(format!("malformed certificate: {e}")))
    }
}

/// A writer: its certificate and secret key.
#[derive(Clone)]
pub struct Identity {
    /// The certificate.
    pub cert: Certificate,
    secret: SigningKey,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    certificate: Certificate,
    secret_key: String,
}

impl Identity {
    /// Pairs a certificate with its secret key; they must match.
    pub fn new(cert: Certificate, secret: SigningKey) -> Result<Self> {
        if cert.key.0 != secret.verifying_key().to_bytes() {
            return Err(Error::Identity(format!(
                "secret key does not match the certificate of {}",
                cert.name
            )));
        }
        Ok(Identity { cert, secret })
    }

    /// Issues a certificate for `secret`'s public key, signed by `root`, and
    /// pairs them.
    pub fn issue(
        root: &SigningKey,
        secret: SigningKey,
        name: &str,
        role: Role,
        site: Option<&str>,
        issued_at: i64,
    ) -> Result<Self> {
        let key = PublicKey(secret.verifying_key().to_bytes());
        let cert = Certificate::issue(root, key, name, role, site, issued_at)?;
        Ok(Identity { cert, secret })
    }

    /// Issues an issuer's certificate for `secret`'s public key and
    /// `sites`, signed by `root`, and pairs them.
    pub fn issue_issuer(
        root: &SigningKey,
        secret: SigningKey,
        name: &str,
        sites: &[String],
        issued_at: i64,
    ) -> Result<Self> {
        let key = PublicKey(secret.verifying_key().to_bytes());
        let cert = Certificate::issue_issuer(root, key, name, sites, issued_at)?;
        Ok(Identity { cert, secret })
    }

    /// The public key.
    pub fn key(&self) -> PublicKey {
        self.cert.key
    }

    /// The 32 secret bytes (the mesh derives this writer's peer id from them).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.secret.sign(msg).to_bytes()
    }

    /// Reads an identity file (JSON with the certificate and the secret key).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Identity::from_json(&path.display().to_string(), &bytes)
    }

    /// Parses the content of an identity file (`label` names it in errors).
    pub fn from_json(label: &str, bytes: &[u8]) -> Result<Self> {
        let file: IdentityFile = serde_json::from_slice(bytes)
            .map_err(|e| Error::Identity(format!("{label} is not an identity file: {e}")))?;
        let secret =
            parse_secret(&file.secret_key).map_err(|e| Error::Identity(format!("{label}: {e}")))?;
        Identity::new(file.certificate, secret)
    }

    /// Writes the identity file with owner-only permissions.
    pub fn write(&self, path: &Path) -> Result<()> {
        let file = IdentityFile {
            certificate: self.cert.clone(),
            secret_key: hex::encode(self.secret.to_bytes()),
        };
        let text = serde_json::to_string_pretty(&file).unwrap_or_default();
        write_private(path, text.as_bytes())
    }
}

/// Generates a fresh Ed25519 key from the OS's randomness.
pub fn generate_key() -> Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| Error::Identity(format!("no randomness from the OS: {e}")))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Parses 64 hex digits of a secret key.
pub fn parse_secret(hex_str: &str) -> std::result::Result<SigningKey, String> {
    let bytes: [u8; 32] = hex::decode(hex_str.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("secret key is not 64 hex digits")?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_verifies_and_detects_tampering() -> anyhow::Result<()> {
        let root = generate_key()?;
        let root_pub = PublicKey(root.verifying_key().to_bytes());
        let k = PublicKey(generate_key()?.verifying_key().to_bytes());
        let cert = Certificate::issue(&root, k, "eve", Role::SiteEngineer, Some("a"), 0)?;
        cert.verify(&root_pub)?;
        let mut forged = cert.clone();
        forged.site = Some("b".into());
        assert!(forged.verify(&root_pub).is_err());
        let other_root = PublicKey(generate_key()?.verifying_key().to_bytes());
        assert!(cert.verify(&other_root).is_err());
        Ok(())
    }

    /// A fleet for the chain tests: root, an operator, an issuer of
    /// site `north`, and a node key.
    struct Chain {
        root: SigningKey,
        root_pub: PublicKey,
        alice: Identity,
        issuer: Identity,
    }

    fn chain() -> anyhow::Result<Chain> {
        let root = generate_key()?;
        let root_pub = PublicKey(root.verifying_key().to_bytes());
        let alice = Identity::issue(&root, generate_key()?, "alice", Role::Operator, None, 0)?;
        let issuer = Identity::issue_issuer(&root, generate_key()?, "iss", &["north".into()], 0)?;
        Ok(Chain {
            root,
            root_pub,
            alice,
            issuer,
        })
    }

    fn fresh_key() -> anyhow::Result<PublicKey> {
        Ok(PublicKey(generate_key()?.verifying_key().to_bytes()))
    }

    /// Signs `cert` with `signer` as its issuer, whatever it says: what a
    /// thief holding an issuer key can make.
    fn forge(mut cert: Certificate, signer: &Identity) -> Certificate {
        cert.issuer = signer.key();
        cert.signature = hex::encode(signer.sign(&cert.signed_bytes()));
        cert
    }

    #[test]
    fn an_issuer_certifies_granted_nodes_of_its_sites() -> anyhow::Result<()> {
        let c = chain()?;
        let grant = Grant::sign(&c.alice, "n1", "north", Default::default(), 0)?;
        let cert = Certificate::issue_via(&c.issuer, fresh_key()?, grant, 0)?;
        cert.verify(&c.root_pub)?;
        assert_eq!(cert.root(), c.root_pub);
        // Through JSON, as it travels.
        Certificate::from_json(cert.to_json().as_bytes())?.verify(&c.root_pub)?;
        // Another fleet's root does not vouch for it.
        let other = fresh_key()?;
        assert!(cert.verify(&other).is_err());
        // The issuer refuses a grant of another site itself.
        let south = Grant::sign(&c.alice, "n2", "south", Default::default(), 0)?;
        assert!(Certificate::issue_via(&c.issuer, fresh_key()?, south, 0).is_err());
        Ok(())
    }

    /// What a thief with an issuer key cannot make: a certificate for an
    /// operator, an anchor, a site engineer or another issuer; a node of a
    /// site the issuer does not cover; a node with no grant, another
    /// node's grant, or a grant no operator signed; a chain of two issuers.
    #[test]
    fn an_issuer_key_certifies_nothing_else() -> anyhow::Result<()> {
        let c = chain()?;
        let grant = Grant::sign(&c.alice, "n1", "north", Default::default(), 0)?;
        let good = Certificate::issue_via(&c.issuer, fresh_key()?, grant.clone(), 0)?;
        let check = |cert: Certificate, want: &str| {
            let e = cert.verify(&c.root_pub).expect_err(want).to_string();
            assert!(e.contains(want), "{want}: {e}");
        };
        for role in [
            Role::Operator,
            Role::Anchor,
            Role::SiteEngineer,
            Role::Issuer,
        ] {
            let mut cert = good.clone();
            cert.role = role;
            check(forge(cert, &c.issuer), "certifies nodes only");
        }
        let mut cert = good.clone();
        cert.site = Some("south".into());
        check(forge(cert, &c.issuer), "not of site south");
        let mut cert = good.clone();
        cert.grant = None;
        check(forge(cert, &c.issuer), "no operator's grant");
        let mut cert = good.clone();
        cert.name = "n9".into();
        check(forge(cert, &c.issuer), "the grant is for n1");
        // A grant signed by a site engineer, or forged in alice's name.
        let eve = Identity::issue(
            &c.root,
            generate_key()?,
            "eve",
            Role::SiteEngineer,
            Some("north"),
            0,
        )?;
        let mut by_eve = grant.clone();
        by_eve.by = Box::new(eve.cert.clone());
        by_eve.signature = hex::encode(eve.sign(&by_eve.signed_bytes()));
        let mut cert = good.clone();
        cert.grant = Some(Box::new(by_eve));
        check(forge(cert, &c.issuer), "not by an operator");
        let mut forged = grant.clone();
        forged.node = "n1".into();
        forged.site = "north".into();
        forged.signature = hex::encode(c.issuer.sign(&forged.signed_bytes()));
        let mut cert = good.clone();
        cert.grant = Some(Box::new(forged));
        check(forge(cert, &c.issuer), "bad signature");
        // An issuer certified by an issuer: chains stop at one.
        let sub = Identity::issue_issuer(&c.root, generate_key()?, "sub", &["north".into()], 0)?;
        let mut sub_cert = forge(sub.cert.clone(), &c.issuer);
        sub_cert.via = Some(Box::new(c.issuer.cert.clone()));
        let sub = Identity::new(sub_cert, SigningKey::from_bytes(&sub.secret_bytes()))?;
        let mut cert = good.clone();
        cert.via = Some(Box::new(sub.cert.clone()));
        check(forge(cert, &sub), "not an issuer the root certified");
        // A node certificate signed by a key that is not its issuer's.
        let mut cert = good.clone();
        cert.signature = hex::encode(c.alice.sign(&cert.signed_bytes()));
        check(cert, "bad signature of issuer");
        Ok(())
    }

    #[test]
    fn site_engineer_needs_site() -> anyhow::Result<()> {
        let root = generate_key()?;
        let k = PublicKey(generate_key()?.verifying_key().to_bytes());
        assert!(Certificate::issue(&root, k, "eve", Role::SiteEngineer, None, 0).is_err());
        Ok(())
    }
}
