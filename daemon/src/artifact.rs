//! `shoal artifact push|import`: a file into a data dir's blob store.
//!
//! Push (an operator, on the data dir of an anchor or of the fleet): the
//! file is hashed while it is copied into `<data-dir>/blobs`, and an
//! Artifact naming its hash and size is applied like any manifest (through
//! the daemon's socket when one holds the data dir). Import (a site
//! engineer's USB stick, on a node): the file is taken only if it hashes to
//! what the fleet document names for that artifact.

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use blobs::{BlobStore, Hash};

use crate::command::Command;
use crate::control;

/// The blob store's directory in a data dir.
pub const BLOBS_DIR: &str = "blobs";

/// The blob store of a data dir (`quota`: most bytes it may hold).
pub fn store(dir: &Path, quota: Option<u64>) -> anyhow::Result<BlobStore> {
    Ok(BlobStore::open(&dir.join(BLOBS_DIR), quota)?)
}

/// What `shoal artifact push` declares besides the file.
#[derive(Clone, Debug, Default)]
pub struct Push {
    /// The artifact's name.
    pub name: String,
    /// Its media type.
    pub media_type: Option<String>,
    /// What it is.
    pub description: Option<String>,
}

/// The Artifact manifest (JSON) for a blob held.
pub fn manifest(p: &Push, hash: &Hash, size: u64) -> serde_json::Value {
    let mut spec = serde_json::json!({ "size": size, "hash": hash.to_string() });
    if let Some(m) = &p.media_type {
        spec["mediaType"] = m.clone().into();
    }
    if let Some(d) = &p.description {
        spec["description"] = d.clone().into();
    }
    serde_json::json!({
        "apiVersion": "shoal.dev/v1",
        "kind": "Artifact",
        "metadata": { "name": p.name },
        "spec": spec,
    })
}

/// Copies `file` into the data dir's blob store and applies the Artifact
/// (signed with `identity`, or the data dir's own). Returns what to print.
pub fn push(dir: &Path, identity: Option<&Path>, file: &Path, p: &Push) -> anyhow::Result<String> {
    crdt_state::fleet::model::validate_name("artifact", &p.name).map_err(|e| anyhow!(e))?;
    let (hash, size) = store(dir, None)?.add_file(file, None)?;
    let manifest = manifest(p, &hash, size);
    let identity_text = identity
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("{}", p.display())))
        .transpose()?;
    let reply = control::run(
        dir,
        identity,
        Command::Apply {
            files: vec![(file.display().to_string(), manifest.to_string())],
            identity: identity_text,
            output: Some("table".into()),
        },
    )?;
    if let Some(e) = reply.error {
        bail!(e);
    }
    Ok(format!(
        "{}blob {hash} ({size} bytes) in {}\n",
        reply.stdout,
        dir.join(BLOBS_DIR).display()
    ))
}

/// Takes `file` into the data dir's blob store as artifact `name`, only if
/// it is the file the fleet document names. Returns what to print.
pub fn import(dir: &Path, file: &Path, name: &str) -> anyhow::Result<String> {
    let reply = control::run(
        dir,
        None,
        Command::Get {
            what: "artifacts".into(),
            output: "json".into(),
        },
    )?;
    if let Some(e) = reply.error {
        bail!(e);
    }
    let all: serde_json::Value = serde_json::from_str(&reply.stdout)?;
    let a = all.get(name).ok_or_else(|| {
        anyhow!(
            "the fleet document names no artifact {name:?} (yet: has this node synced since it was pushed?)"
        )
    })?;
    let hash = Hash::parse(a["hash"].as_str().unwrap_or_default())?;
    let size = a["size"]
        .as_u64()
        .ok_or_else(|| anyhow!("artifact {name} has no size"))?;
    let store = store(dir, None)?;
    if store.has(&hash) {
        return Ok(format!("artifact {name} ({hash}) is already here\n"));
    }
    store.add_file(file, Some((hash, size)))?;
    Ok(format!("artifact {name} verified ({hash}, {size} bytes)\n"))
}
