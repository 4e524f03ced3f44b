//! Operator tokens: bearer secrets for the HTTP API and the web UI.
//!
//! `shoal operator token create --name alice` prints a 256-bit secret once;
//! the anchor keeps only its SHA-256 (in `operators.json`, owner-only), the
//! operator's name and the creation and expiry times. The secrets are
//! random, not chosen by people, so a plain hash is enough: nothing to
//! brute-force. The running anchor rereads the file when it changes, so a
//! token created or revoked with the CLI takes effect at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file in the anchor's data dir.
pub const OPERATORS_FILE: &str = "operators.json";
/// What every token starts with (so a leaked one is recognisable).
pub const TOKEN_PREFIX: &str = "shoal-op-";

/// What a token may do. Each role may do everything the roles before it
/// may: a viewer reads; a site engineer also applies the overrides of the
/// site its token names; an operator edits the fleet; an admin also
/// decommissions nodes (which revokes their certificates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiRole {
    /// Reads.
    Viewer,
    /// Reads, and applies its site's `SiteOverride`.
    SiteEngineer,
    /// Fleet edits.
    Operator,
    /// Everything, revocations included.
    Admin,
}

impl ApiRole {
    /// Every role, least first.
    pub const ALL: [ApiRole; 4] = [
        ApiRole::Viewer,
        ApiRole::SiteEngineer,
        ApiRole::Operator,
        ApiRole::Admin,
    ];

    /// The name used in files, flags and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiRole::Viewer => "viewer",
            ApiRole::SiteEngineer => "site-engineer",
            ApiRole::Operator => "operator",
            ApiRole::Admin => "admin",
        }
    }

    /// Tokens written before roles existed could do everything.
    fn before_roles() -> ApiRole {
        ApiRole::Admin
    }
}

impl std::fmt::Display for ApiRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ApiRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ApiRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?}: expected viewer, site-engineer, operator or admin")
            })
    }
}

/// One operator's token, as kept at rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    /// The operator's name (recorded in the changes they make).
    pub name: String,
    /// SHA-256 of the secret, hex.
    pub sha256: String,
    /// Created (Unix seconds).
    pub created_at: i64,
    /// Expires (Unix seconds), if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// What it may do (absent in files written before roles: admin, which
    /// is what those tokens could do).
    #[serde(default = "ApiRole::before_roles")]
    pub role: ApiRole,
    /// The site a site engineer's token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Reads the tokens of a data dir (none if the file is absent).
pub fn read(dir: &Path) -> anyhow::Result<Vec<TokenEntry>> {
    let path = dir.join(OPERATORS_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("{}", path.display())),
    }
}

fn write(dir: &Path, entries: &[TokenEntry]) -> anyhow::Result<()> {
    write_private(
        &dir.join(OPERATORS_FILE),
        &serde_json::to_vec_pretty(entries)?,
    )
}

/// Writes a file only its owner reads, whole or not at all (a temporary
/// file synced, then renamed over it).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("{}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))?;
    Ok(())
}

/// Creates a token for `name` with `role` (and the site of a site
/// engineer) and returns the secret (shown once).
pub fn create(
    dir: &Path,
    name: &str,
    role: ApiRole,
    site: Option<&str>,
    ttl_s: Option<i64>,
    now: i64,
) -> anyhow::Result<String> {
    crdt_state::fleet::model::validate_name("operator", name).map_err(|e| anyhow!(e))?;
    match (role, site) {
        (ApiRole::SiteEngineer, None) => bail!("a site engineer's token needs --site"),
        (ApiRole::SiteEngineer, Some(s)) => {
            crdt_state::fleet::model::validate_name("site", s).map_err(|e| anyhow!(e))?
        }
        (_, Some(_)) => bail!("only a site engineer's token names a site (--role site-engineer)"),
        (_, None) => {}
    }
    if !dir.join(crdt_state::local::datadir::ROOT_KEY_FILE).exists()
        && !dir.join(crdt_state::local::datadir::IDENTITY_FILE).exists()
        && !dir.join(daemon::enroll::ANCHOR_IDENTITY_FILE).exists()
    {
        bail!(
            "{} is not an anchor's data dir (made by `shoal fleet init`)",
            dir.display()
        );
    }
    if ttl_s.is_some_and(|t| t <= 0) {
        bail!("token lifetime must be positive");
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow!("no randomness from the OS: {e}"))?;
    let secret = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
    let mut entries = read(dir)?;
    entries.push(TokenEntry {
        name: name.to_string(),
        sha256: digest(&secret),
        created_at: now,
        expires_at: ttl_s.map(|t| now + t),
        role,
        site: site.map(str::to_string),
    });
    write(dir, &entries)?;
    Ok(secret)
}

/// Revokes every token of `name`; returns how many there were.
pub fn revoke(dir: &Path, name: &str) -> anyhow::Result<usize> {
    let mut entries = read(dir)?;
    let before = entries.len();
    entries.retain(|e| e.name != name);
    let n = before - entries.len();
    if n == 0 {
        bail!("no operator token named {name:?}");
    }
    write(dir, &entries)?;
    Ok(n)
}

/// The tokens a running anchor checks requests against; rereads the file
/// when its modification time changes.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, BTreeMap<String, TokenEntry>)>,
    /// Tokens made or revoked since the file was first read, for the
    /// timeline ([`Tokens::take_news`]).
    news: Mutex<Vec<TokenNews>>,
    loaded: std::sync::atomic::AtomicBool,
}

/// A token made or revoked on the anchor's host: (kind, the token's name,
/// words for people).
pub type TokenNews = (&'static str, String, String);

impl Tokens {
    /// Tokens of the data dir `dir`.
    pub fn new(dir: &Path) -> Tokens {
        Tokens {
            path: dir.join(OPERATORS_FILE),
            cache: Mutex::new((None, BTreeMap::new())),
            news: Mutex::new(Vec::new()),
            loaded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The data dir the tokens are of.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Tokens made or revoked since the last call, as the file showed when
    /// it was read again (at the request after the change).
    pub fn take_news(&self) -> Vec<TokenNews> {
        self.news
            .lock()
            .map(|mut n| std::mem::take(&mut *n))
            .unwrap_or_default()
    }

    /// The token a secret is, if it is valid at `now`.
    pub fn check(&self, secret: &str, now: i64) -> Option<TokenEntry> {
        if !secret.starts_with(TOKEN_PREFIX) || secret.len() > 256 {
            return None;
        }
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut cache = self.cache.lock().ok()?;
        if cache.0 != mtime || mtime.is_none() {
            let entries = self
                .path
                .parent()
                .map(read)
                .and_then(Result::ok)
                .unwrap_or_default();
            let fresh: BTreeMap<String, TokenEntry> =
                entries.into_iter().map(|e| (e.sha256.clone(), e)).collect();
            if self.loaded.swap(true, std::sync::atomic::Ordering::Relaxed)
                && let Ok(mut news) = self.news.lock()
            {
                for (h, e) in &fresh {
                    if !cache.1.contains_key(h) {
                        let site = e
                            .site
                            .as_deref()
                            .map(|s| format!(" of site {s}"))
                            .unwrap_or_default();
                        news.push((
                            "token",
                            e.name.clone(),
                            format!(
                                "operator token {} ({}{site}) created, {}…",
                                e.name,
                                e.role,
                                &h[..8.min(h.len())]
                            ),
                        ));
                    }
                }
                for (h, e) in &cache.1 {
                    if !fresh.contains_key(h) {
                        news.push((
                            "token",
                            e.name.clone(),
                            format!(
                                "operator token {} ({}) revoked, {}…",
                                e.name,
                                e.role,
                                &h[..8.min(h.len())]
                            ),
                        ));
                    }
                }
                news.truncate(1000);
            }
            cache.1 = fresh;
            cache.0 = mtime;
        }
        let e = cache.1.get(&digest(secret))?;
        if e.expires_at.is_some_and(|x| x <= now) {
            return None;
        }
        Some(e.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_check_revoke() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("root.key"), b"x")?;
        let t = create(dir.path(), "alice", ApiRole::Operator, None, None, 100)?;
        let short = create(dir.path(), "bob", ApiRole::Viewer, None, Some(10), 100)?;
        let eng = create(
            dir.path(),
            "carol",
            ApiRole::SiteEngineer,
            Some("north"),
            None,
            100,
        )?;
        let text = std::fs::read_to_string(dir.path().join(OPERATORS_FILE))?;
        assert!(!text.contains(&t), "the secret itself must not be stored");
        let tokens = Tokens::new(dir.path());
        let name = |t: &str, now| tokens.check(t, now).map(|e| (e.name, e.role, e.site));
        assert_eq!(
            name(&t, 200),
            Some(("alice".into(), ApiRole::Operator, None))
        );
        assert_eq!(
            name(&short, 105),
            Some(("bob".into(), ApiRole::Viewer, None))
        );
        assert_eq!(
            name(&eng, 105),
            Some(("carol".into(), ApiRole::SiteEngineer, Some("north".into())))
        );
        assert_eq!(tokens.check(&short, 111), None, "expired");
        assert_eq!(tokens.check("shoal-op-00", 100), None);
        assert_eq!(tokens.check("", 100), None);
        assert_eq!(revoke(dir.path(), "alice")?, 1);
        // The file changed: a fresh check sees the revocation.
        let tokens = Tokens::new(dir.path());
        assert_eq!(tokens.check(&t, 200), None);
        assert!(revoke(dir.path(), "alice").is_err());
        assert!(create(dir.path(), "no/slash", ApiRole::Admin, None, None, 1).is_err());
        let e = create(dir.path(), "dan", ApiRole::SiteEngineer, None, None, 1).unwrap_err();
        assert!(e.to_string().contains("--site"), "{e}");
        let e = create(dir.path(), "dan", ApiRole::Operator, Some("north"), None, 1).unwrap_err();
        assert!(e.to_string().contains("site engineer"), "{e}");
        Ok(())
    }

    #[test]
    fn tokens_from_before_roles_are_admins_and_roles_are_ordered() -> anyhow::Result<()> {
        let old = r#"[{"name":"ops","sha256":"00","created_at":1}]"#;
        let e: Vec<TokenEntry> = serde_json::from_str(old)?;
        assert_eq!(e[0].role, ApiRole::Admin);
        assert!(ApiRole::Viewer < ApiRole::SiteEngineer);
        assert!(ApiRole::SiteEngineer < ApiRole::Operator);
        assert!(ApiRole::Operator < ApiRole::Admin);
        for r in ApiRole::ALL {
            assert_eq!(r.as_str().parse::<ApiRole>(), Ok(r));
        }
        assert!("root".parse::<ApiRole>().unwrap_err().contains("viewer"));
        Ok(())
    }
}
