//! What the kube runtime created, kept in the node's data dir so that
//! pruning and deletion converge after any interruption.
//!
//! Per app: its namespace, every object Shoal applied and has not yet seen
//! gone (by group, kind, namespace and name — never by apiVersion, so a
//! version change keeps the object), its UID, a hash of the body last
//! applied and of the fields Shoal's field manager owns afterwards (drift
//! shows as a change of those), and the version whose rollout last
//! completed. Across apps: the namespaces Shoal created (marked with
//! [`CREATED_BY`], and their UID); only those are ever deleted.
//!
//! An object is recorded before it is applied and forgotten only after its
//! deletion was accepted (or it was found gone), so a crash, an API-server
//! outage or a failed apply never makes Shoal forget something it made.
//! The file is replaced atomically (write, fsync, rename, fsync the
//! directory).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Annotation on a namespace Shoal created; a namespace without it is never
/// deleted, whatever the inventory says.
pub const CREATED_BY: (&str, &str) = ("shoal.dev/created-by", "shoal");

/// Identity of an object in the cluster, independent of its apiVersion.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjKey {
    /// API group (`""` for the core group).
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Namespace; `None` for a cluster-scoped object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ObjKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// What Shoal knows of one object it applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjRecord {
    /// The apiVersion it was last applied (or found) with.
    pub api_version: String,
    /// Its UID, once the API server answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Hash of the body last applied successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<String>,
    /// Hash of the fields Shoal's field manager owned after that apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<String>,
    /// resourceVersion of Shoal's last write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// The object with `uid` went away or lost Shoal's labels: whatever
    /// holds the name is looked at before Shoal writes or deletes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unverified: bool,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    key: ObjKey,
    #[serde(flatten)]
    record: ObjRecord,
}

mod entries {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<ObjKey, ObjRecord>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let v: Vec<Entry> = m
            .iter()
            .map(|(k, r)| Entry {
                key: k.clone(),
                record: r.clone(),
            })
            .collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ObjKey, ObjRecord>, D::Error> {
        let v: Vec<Entry> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|e| (e.key, e.record)).collect())
    }
}

/// One app's objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// The namespace the app lives in.
    pub namespace: String,
    /// Objects applied and not yet seen gone.
    #[serde(with = "entries")]
    pub objects: BTreeMap<ObjKey, ObjRecord>,
    /// The version whose rollout last completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_version: Option<String>,
}

/// Everything the kube runtime owns.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Format version.
    pub format: u32,
    /// Per app.
    pub apps: BTreeMap<String, AppRecord>,
    /// Namespaces Shoal created (or is about to create), with their UID
    /// once the API server gave it.
    pub namespaces: BTreeMap<String, Option<String>>,
}

/// The inventory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// Reading or writing the file failed.
    #[error("kube inventory {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not an inventory.
    #[error(
        "kube inventory {path} is corrupt ({source}); nothing was changed: move it aside to start \
         afresh (Shoal then adopts by label only the objects of apps it still runs)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// The inventory kept in `dir/inventory.json`.
pub struct Stored {
    path: PathBuf,
    /// What it holds.
    pub inv: Inventory,
    saved: Inventory,
}

impl Stored {
    /// Opens (or starts) the inventory in `dir`.
    pub fn open(dir: &Path) -> Result<Stored, InventoryError> {
        let io = |source| InventoryError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("inventory.json");
        let inv = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| InventoryError::Corrupt {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Inventory {
                format: 1,
                ..Inventory::default()
            },
            Err(source) => return Err(InventoryError::Io { path, source }),
        };
        Ok(Stored {
            path,
            saved: inv.clone(),
            inv,
        })
    }

    /// Writes the inventory if it changed since the last save.
    pub fn save(&mut self) -> Result<(), InventoryError> {
        if self.inv == self.saved {
            return Ok(());
        }
        let io = |source| InventoryError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.inv).map_err(|e| io(e.into()))?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        self.saved = self.inv.clone();
        Ok(())
    }

    /// Is `ns` still used by any app (as its namespace or by an object)?
    pub fn namespace_in_use(&self, ns: &str) -> bool {
        self.inv.apps.values().any(|a| {
            a.namespace == ns || a.objects.keys().any(|k| k.namespace.as_deref() == Some(ns))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reopen_and_refuses_garbage() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut s = Stored::open(dir.path())?;
        let key = ObjKey {
            group: "apps".into(),
            kind: "Deployment".into(),
            namespace: Some("shoal-web".into()),
            name: "web".into(),
        };
        s.inv.apps.entry("web".into()).or_default().objects.insert(
            key.clone(),
            ObjRecord {
                api_version: "apps/v1".into(),
                uid: Some("u1".into()),
                ..ObjRecord::default()
            },
        );
        s.inv
            .namespaces
            .insert("shoal-web".into(), Some("n1".into()));
        s.save()?;
        let again = Stored::open(dir.path())?;
        assert_eq!(again.inv, s.inv);
        assert_eq!(
            again.inv.apps["web"].objects[&key].uid.as_deref(),
            Some("u1")
        );
        assert!(again.namespace_in_use("shoal-web"));
        assert!(!again.namespace_in_use("other"));

        std::fs::write(dir.path().join("inventory.json"), b"{\"apps\": 3")?;
        let Err(e) = Stored::open(dir.path()) else {
            panic!("a corrupt inventory was read");
        };
        let e = e.to_string();
        assert!(e.contains("inventory.json is corrupt"), "{e}");
        // The corrupt file is left as it was.
        assert_eq!(
            std::fs::read(dir.path().join("inventory.json"))?,
            b"{\"apps\": 3"
        );
        Ok(())
    }
}
