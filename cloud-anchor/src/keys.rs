//! Browser keys: how an operator's browser gets a certified signing key
//! (ADR 0015).
//!
//! An admin invites a writer by name and role (`shoal identity invite`, or
//! `POST /api/keys/invite`); the anchor keeps the one-time code's SHA-256
//! (in `browser-keys.json`, owner-only) with the name, role and site. The
//! operator's browser makes an Ed25519 key it cannot export (WebCrypto, kept
//! in IndexedDB) and sends its public half with the code: the code binds to
//! that one key. The certificate is then issued by the fleet root for that
//! key, name and role: on the admin's machine (`shoal identity approve`,
//! which checks the fingerprint the browser shows), or at once by an anchor
//! that still holds the root key. The anchor never holds the private key,
//! and a certificate it did not get from the root it cannot make.

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, anyhow, bail};
use crdt_state::{Certificate, PublicKey, Role};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file in the anchor's data dir.
pub const KEYS_FILE: &str = "browser-keys.json";
/// What every code starts with.
pub const CODE_PREFIX: &str = "shoal-key-";
/// How long an invitation is good for unless told (a day).
pub const DEFAULT_TTL_S: i64 = 24 * 3600;
/// Hex digits of a key a person compares (96 bits).
pub const FINGERPRINT_HEX: usize = 24;

/// One invitation and what became of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The writer's name (the certificate's).
    pub name: String,
    /// `operator` or `site-engineer`.
    pub role: Role,
    /// A site engineer's site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// SHA-256 of the code, hex.
    pub sha256: String,
    /// Who invited (the admin's token name).
    pub by: String,
    /// Made (Unix seconds).
    pub created_at: i64,
    /// The code is refused after this (Unix seconds).
    pub expires_at: i64,
    /// The key the code was used for (one only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PublicKey>,
    /// When the key came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<i64>,
    /// The root's certificate for the key, once issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Certificate>,
}

impl Invite {
    /// `invited` (no key yet), `pending` (a key waits for its
    /// certificate), `certified`, or `expired`.
    pub fn state(&self, now: i64) -> &'static str {
        match (&self.key, &self.certificate) {
            (_, Some(_)) => "certified",
            _ if self.expired(now) => "expired",
            (Some(_), None) => "pending",
            (None, None) => "invited",
        }
    }

    /// Whether the code is past its time with no certificate issued.
    pub fn expired(&self, now: i64) -> bool {
        self.certificate.is_none() && now > self.expires_at
    }

    /// The invitation as the API lists it (no code hash).
    pub fn to_json(&self, now: i64) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "role": self.role.to_string(),
            "site": self.site,
            "by": self.by,
            "state": self.state(now),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "key": self.key.map(|k| k.to_hex()),
            "fingerprint": self.key.map(|k| fingerprint(&k)),
            "requested_at": self.requested_at,
            "certificate": self.certificate,
        })
    }
}

/// What a person compares between the browser and `shoal identity
/// approve`: the key's first [`FINGERPRINT_HEX`] hex digits in groups of
/// four.
pub fn fingerprint(key: &PublicKey) -> String {
    let hex = key.to_hex();
    hex.as_bytes()[..FINGERPRINT_HEX]
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `typed` (spaces ignored, any case) is the fingerprint of `key`:
/// at least 16 hex digits, all a prefix of the key.
pub fn fingerprint_matches(key: &PublicKey, typed: &str) -> bool {
    let typed: String = typed
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    typed.len() >= 16 && key.to_hex().starts_with(&typed)
}

/// One writer of the file at a time (the API's blocking threads).
static LOCK: Mutex<()> = Mutex::new(());

fn digest(code: &str) -> String {
    hex::encode(Sha256::digest(code.trim().as_bytes()))
}

/// The invitations of a data dir (none if the file is absent).
pub fn read(dir: &Path) -> anyhow::Result<Vec<Invite>> {
    let path = dir.join(KEYS_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("{}", path.display())),
    }
}

fn write(dir: &Path, entries: &[Invite]) -> anyhow::Result<()> {
    crate::tokens::write_private(&dir.join(KEYS_FILE), &serde_json::to_vec_pretty(entries)?)
}

/// Reads, changes and writes the file under the lock. A failure of the
/// file itself is a 500.
fn update<R>(
    dir: &Path,
    f: impl FnOnce(&mut Vec<Invite>) -> Result<R, Refused>,
) -> Result<R, Refused> {
    let _held = LOCK
        .lock()
        .map_err(|_| Refused(500, "the key file's lock is poisoned".into()))?;
    let mut entries = read(dir).map_err(Refused::internal)?;
    let r = f(&mut entries)?;
    write(dir, &entries).map_err(Refused::internal)?;
    Ok(r)
}

/// Invites `name` as `role` (a site engineer for `site`); returns the
/// one-time code (shown once).
pub fn invite(
    dir: &Path,
    name: &str,
    role: Role,
    site: Option<&str>,
    by: &str,
    ttl_s: i64,
    now: i64,
) -> anyhow::Result<String> {
    crdt_state::fleet::model::validate_name("writer", name).map_err(|e| anyhow!(e))?;
    match (role, site) {
        (Role::Operator, None) => {}
        (Role::Operator, Some(_)) => bail!("an operator's key names no site"),
        (Role::SiteEngineer, Some(s)) => {
            crdt_state::fleet::model::validate_name("site", s).map_err(|e| anyhow!(e))?
        }
        (Role::SiteEngineer, None) => bail!("a site engineer's key needs a site"),
        (other, _) => bail!("a browser key is an operator's or a site engineer's, not a {other}'s"),
    }
    if ttl_s <= 0 {
        bail!("an invitation's lifetime must be positive");
    }
    let mut secret = [0u8; 16];
    getrandom::fill(&mut secret).map_err(|e| anyhow!("no randomness from the OS: {e}"))?;
    let code = format!("{CODE_PREFIX}{}", hex::encode(secret));
    update(dir, |entries| {
        // Expired invitations nobody used go when a new one comes.
        entries.retain(|e| !e.expired(now));
        entries.push(Invite {
            name: name.to_string(),
            role,
            site: site.map(str::to_string),
            sha256: digest(&code),
            by: by.to_string(),
            created_at: now,
            expires_at: now + ttl_s,
            key: None,
            requested_at: None,
            certificate: None,
        });
        Ok(())
    })?;
    Ok(code)
}

/// Why a code was not taken, with the HTTP status to answer.
#[derive(Debug)]
pub struct Refused(pub u16, pub String);

impl Refused {
    fn internal(e: anyhow::Error) -> Refused {
        Refused(500, format!("{e:#}"))
    }
}

/// A browser sends its public key with a code: the code binds to that key
/// (sending the same key again answers the invitation as it is now; a
/// different key is refused). Returns the invitation, and whether the key
/// was bound now (its first coming).
pub fn submit(dir: &Path, code: &str, key: PublicKey, now: i64) -> Result<(Invite, bool), Refused> {
    let sha = digest(code);
    update(dir, |entries| {
        let e = entries
            .iter_mut()
            .find(|e| e.sha256 == sha)
            .ok_or_else(|| Refused(403, "no such invitation code".into()))?;
        match e.key {
            Some(k) if k != key => Err(Refused(
                409,
                format!(
                    "this code was already used for another key ({}); ask for a new invitation",
                    fingerprint(&k)
                ),
            )),
            _ if e.expired(now) => Err(Refused(
                403,
                format!("the invitation for {} expired", e.name),
            )),
            Some(_) => Ok((e.clone(), false)),
            None => {
                e.key = Some(key);
                e.requested_at = Some(now);
                Ok((e.clone(), true))
            }
        }
    })
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Refused {}

/// The invitation a root-issued certificate answers: the one whose code
/// was used for that key, for the same name, role and site, not expired.
fn find<'a>(
    entries: &'a mut [Invite],
    cert: &Certificate,
    now: i64,
) -> Result<&'a mut Invite, Refused> {
    let e = entries
        .iter_mut()
        .find(|e| e.key == Some(cert.key))
        .ok_or_else(|| {
            Refused(
                404,
                format!(
                    "no browser key {} waits for a certificate",
                    fingerprint(&cert.key)
                ),
            )
        })?;
    let of = |site: Option<&str>| site.map(|s| format!(" of {s}")).unwrap_or_default();
    if (e.name.as_str(), e.role, e.site.as_deref())
        != (cert.name.as_str(), cert.role, cert.site.as_deref())
    {
        return Err(Refused(
            400,
            format!(
                "the invitation is for {} ({}{}), the certificate for {} ({}{})",
                e.name,
                e.role,
                of(e.site.as_deref()),
                cert.name,
                cert.role,
                of(cert.site.as_deref())
            ),
        ));
    }
    if e.expired(now) {
        return Err(Refused(
            403,
            format!("the invitation for {} expired", e.name),
        ));
    }
    Ok(e)
}

/// Checks, without recording, that `cert` answers an invitation.
pub fn matching(dir: &Path, cert: &Certificate, now: i64) -> Result<Invite, Refused> {
    let mut entries = read(dir).map_err(Refused::internal)?;
    find(&mut entries, cert, now).map(|e| e.clone())
}

/// Records the root's certificate for a key that came with a code.
pub fn certified(dir: &Path, cert: &Certificate, now: i64) -> Result<Invite, Refused> {
    update(dir, |entries| {
        let e = find(entries, cert, now)?;
        e.certificate = Some(cert.clone());
        Ok(e.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    #[test]
    fn a_code_binds_to_one_key_and_expires() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let code = invite(dir.path(), "alice", Role::Operator, None, "root", 60, 100)?;
        assert!(code.starts_with(CODE_PREFIX));
        let on_disk = std::fs::read_to_string(dir.path().join(KEYS_FILE))?;
        assert!(!on_disk.contains(&code), "the code is stored hashed");
        let (got, first) = submit(dir.path(), &code, key(1), 110).map_err(|e| anyhow!(e))?;
        assert_eq!(
            (got.key, got.state(110), first),
            (Some(key(1)), "pending", true)
        );
        // The same key again: the same invitation; another key: refused.
        let again = submit(dir.path(), &code, key(1), 120).map_err(|e| anyhow!(e))?;
        assert_eq!((again.0.key, again.1), (Some(key(1)), false));
        let other = submit(dir.path(), &code, key(2), 120).err().map(|r| r.0);
        assert_eq!(other, Some(409));
        assert_eq!(
            submit(dir.path(), "shoal-key-00", key(3), 120)
                .err()
                .map(|r| r.0),
            Some(403)
        );
        let late = invite(dir.path(), "bob", Role::Operator, None, "root", 60, 100)?;
        let r = submit(dir.path(), &late, key(4), 161).err();
        assert!(
            r.as_ref()
                .is_some_and(|r| r.0 == 403 && r.1.contains("expired")),
            "{r:?}"
        );
        Ok(())
    }

    #[test]
    fn only_operators_and_site_engineers_are_invited() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for (role, site) in [
            (Role::Anchor, None),
            (Role::Issuer, None),
            (Role::Node, Some("north")),
            (Role::SiteEngineer, None),
            (Role::Operator, Some("north")),
        ] {
            assert!(
                invite(dir.path(), "x", role, site, "root", 60, 0).is_err(),
                "{role} {site:?} invited"
            );
        }
        invite(
            dir.path(),
            "eve",
            Role::SiteEngineer,
            Some("north"),
            "root",
            60,
            0,
        )?;
        Ok(())
    }

    #[test]
    fn fingerprints_are_compared_as_prefixes() {
        let k = PublicKey([0xab; 32]);
        assert_eq!(fingerprint(&k), "abab abab abab abab abab abab");
        assert!(fingerprint_matches(&k, "ABAB abab abab abab"));
        assert!(!fingerprint_matches(&k, "abab abab"), "too short");
        assert!(!fingerprint_matches(&k, "abab abab abab abac"));
    }
}
