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
    /// An always-on cloud peer; writes the fleet document (enrollment) and
    /// site documents on behalf of authenticated operators.
    Anchor,
    /// An edge node; writes its own node document.
    Node,
}

impl Role {
    /// The name used on the command line and in files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::SiteEngineer => "site-engineer",
            Role::Anchor => "anchor",
            Role::Node => "node",
        }
    }

    fn code(&self) -> u8 {
        match self {
            Role::Operator => 1,
            Role::SiteEngineer => 2,
            Role::Anchor => 3,
            Role::Node => 4,
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
            other => {
                return Err(Error::Identity(format!(
                    "unknown role {other:?}: expected operator, site-engineer, anchor or node"
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

/// A root-signed binding of a key to a name, role and site.
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
    /// The fleet root key that signed this certificate.
    pub issuer: PublicKey,
    /// Seconds since the epoch at issue, for people only: never checked.
    pub issued_at: i64,
    /// Root signature, hex.
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
        let mut cert = Certificate {
            key,
            name: name.to_string(),
            role,
            site: site.map(str::to_string),
            issuer: PublicKey(root.verifying_key().to_bytes()),
            issued_at,
            signature: String::new(),
        };
        let sig = root.sign(&cert.signed_bytes());
        cert.signature = hex::encode(sig.to_bytes());
        Ok(cert)
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(CERT_DOMAIN);
        out.extend_from_slice(&self.issuer.0);
        out.extend_from_slice(&self.key.0);
        out.push(self.role.code());
        for s in [self.name.as_str(), self.site.as_deref().unwrap_or("")] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out
    }

    /// Checks the root signature against the fleet root `root`.
    pub fn verify(&self, root: &PublicKey) -> Result<()> {
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

    /// Whether this certificate lets its key write document `doc`.
    pub fn may_write(&self, doc: &crate::signed::doc::DocId) -> bool {
        use crate::signed::doc::DocId;
        match (doc, self.role) {
            (DocId::Fleet, Role::Operator | Role::Anchor) => true,
            (DocId::Site(_), Role::Operator | Role::Anchor) => true,
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

    #[test]
    fn site_engineer_needs_site() -> anyhow::Result<()> {
        let root = generate_key()?;
        let k = PublicKey(generate_key()?.verifying_key().to_bytes());
        assert!(Certificate::issue(&root, k, "eve", Role::SiteEngineer, None, 0).is_err());
        Ok(())
    }
}
