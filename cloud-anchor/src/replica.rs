//! Anchor replicas: several anchors of one fleet, peers of each other.
//!
//! A replica's data dir is made from a seed (what `shoal anchor
//! replica-seed` writes from a running anchor's data dir): the fleet root
//! key (anchors certify enrolling nodes), the operator identity API edits
//! are signed with, the operator tokens, and a bundle of every document.
//! On its first run the replica makes its own anchor certificate, like any
//! anchor; connected to the others it syncs everything it missed. The
//! store file is moved into place last, so a half-made replica is never
//! mistaken for a finished one (the StatefulSet's init container tests for
//! it).

use std::path::Path;

use anyhow::{Context, bail};
use crdt_state::DataDir;
use crdt_state::local::datadir::{IDENTITY_FILE, ROOT_KEY_FILE, STORE_FILE};

/// The seed's bundle file.
pub const SEED_BUNDLE: &str = "fleet.bundle";

fn copy_private(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = std::fs::read(from).with_context(|| format!("{}", from.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("{}", to.display()))?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Writes a seed directory from an anchor's data dir (running or not: the
/// bundle comes through the daemon's control socket when one holds it).
pub fn seed(data_dir: &Path, out: &Path) -> anyhow::Result<()> {
    let identity = crdt_state::Identity::read(&data_dir.join(IDENTITY_FILE))?;
    let root_text = std::fs::read_to_string(data_dir.join(ROOT_KEY_FILE)).with_context(|| {
        format!(
            "{} holds no fleet root key: seed replicas from the anchor made by `shoal fleet init`",
            data_dir.display()
        )
    })?;
    let root = crdt_state::signed::identity::parse_secret(&root_text)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if crdt_state::PublicKey(root.verifying_key().to_bytes()) != identity.cert.issuer {
        bail!("{}: the root key is not the fleet's", data_dir.display());
    }
    let reply = daemon::control::run(
        data_dir,
        None,
        daemon::command::Command::Export { only: None },
    )?;
    if let Some(e) = reply.error {
        bail!(e);
    }
    let bundle = hex::decode(reply.data.unwrap_or_default())
        .map_err(|_| anyhow::anyhow!("bundle bytes damaged in transit"))?;
    if out.exists() {
        bail!("{} exists already", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
    let r = (|| {
        copy_private(&data_dir.join(ROOT_KEY_FILE), &out.join(ROOT_KEY_FILE))?;
        copy_private(&data_dir.join(IDENTITY_FILE), &out.join(IDENTITY_FILE))?;
        let ops = data_dir.join(crate::tokens::OPERATORS_FILE);
        if ops.exists() {
            copy_private(&ops, &out.join(crate::tokens::OPERATORS_FILE))?;
        }
        std::fs::write(out.join(SEED_BUNDLE), &bundle)?;
        anyhow::Ok(())
    })();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(out);
    }
    r
}

/// Makes a replica's data dir from a seed directory.
pub fn init(data_dir: &Path, seed: &Path) -> anyhow::Result<()> {
    if data_dir.join(STORE_FILE).exists() {
        bail!("{} holds a store already", data_dir.display());
    }
    for f in [ROOT_KEY_FILE, IDENTITY_FILE, SEED_BUNDLE] {
        if !seed.join(f).exists() {
            bail!("the seed {} has no {f}", seed.display());
        }
    }
    let tmp = data_dir.join(".replica-init");
    let _ = std::fs::remove_dir_all(&tmp);
    let r = (|| {
        let mut dd = DataDir::use_identity(&tmp, &seed.join(IDENTITY_FILE))?;
        copy_private(&seed.join(ROOT_KEY_FILE), &tmp.join(ROOT_KEY_FILE))?;
        dd.check_root_key()?;
        let bundle = std::fs::read(seed.join(SEED_BUNDLE))?;
        let report = dd.import(&bundle).context("the seed's bundle")?;
        if report.waiting > 0 {
            bail!(
                "the seed's bundle is incomplete ({} changes wait for others)",
                report.waiting
            );
        }
        drop(dd);
        let ops = seed.join(crate::tokens::OPERATORS_FILE);
        if ops.exists() {
            copy_private(&ops, &tmp.join(crate::tokens::OPERATORS_FILE))?;
        }
        for f in [
            ROOT_KEY_FILE,
            IDENTITY_FILE,
            crate::tokens::OPERATORS_FILE,
            STORE_FILE,
        ] {
            if tmp.join(f).exists() {
                std::fs::rename(tmp.join(f), data_dir.join(f))
                    .with_context(|| format!("{}", data_dir.join(f).display()))?;
            }
        }
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    r
}
