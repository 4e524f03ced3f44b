//! An anchor's audit trail — its timeline and its security log — kept in
//! the same redb file as its documents, so both survive a restart
//! (issue 17). Outside every CRDT: it is what this anchor saw.
//!
//! | table | key | value |
//! |---|---|---|
//! | `audit` | (log, sequence) | the entry as JSON |
//!
//! Each log keeps its newest `keep` entries; appending past that deletes
//! the oldest in the same transaction.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::local::store::Store;

const AUDIT: TableDefinition<(u8, u64), &[u8]> = TableDefinition::new("audit");

/// Which log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditLog {
    /// Partitions, merges, edits, conflicts, enrollments.
    Timeline,
    /// Refusals: bad frames, forged changes, refused requests.
    Security,
}

impl AuditLog {
    fn key(self) -> u8 {
        match self {
            AuditLog::Timeline => 0,
            AuditLog::Security => 1,
        }
    }
}

/// One entry, as the anchor's view holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When (Unix seconds, on the clock of the anchor that recorded it).
    pub at: i64,
    /// Its kind (`edit`, `connected`, …; empty in the security log).
    #[serde(default)]
    pub kind: String,
    /// What it concerns: a node, site or document; in the security log,
    /// who was refused.
    pub subject: String,
    /// Words for people.
    pub text: String,
    /// The anchor that recorded it: replicas exchange their entries, so
    /// each anchor shows every anchor's (empty in entries stored before).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub anchor: String,
    /// Its number at that anchor, in its log: 1, 2, 3…
    #[serde(default, skip_serializing_if = "is_zero")]
    pub id: u64,
    /// Who acted, when known: an operator token's name, the writer a
    /// change's signature names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub who: Option<String>,
    /// From where, when known: a client's address, a peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn err(store: &Store, e: impl std::fmt::Display) -> Error {
    Error::Store {
        path: store.path().to_path_buf(),
        reason: e.to_string(),
    }
}

impl Store {
    /// Appends `entries` to `log` in one transaction and deletes its
    /// oldest entries beyond `keep`.
    pub fn append_audit(&self, log: AuditLog, entries: &[AuditEntry], keep: u64) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.guard(|| {
            let l = log.key();
            let wtx = self.db()?.begin_write().map_err(|e| err(self, e))?;
            {
                let mut t = wtx.open_table(AUDIT).map_err(|e| err(self, e))?;
                let mut next = t
                    .range((l, 0)..=(l, u64::MAX))
                    .map_err(|e| err(self, e))?
                    .next_back()
                    .transpose()
                    .map_err(|e| err(self, e))?
                    .map_or(0, |(k, _)| k.value().1 + 1);
                for e in entries {
                    let json = serde_json::to_vec(e).map_err(|e| err(self, e))?;
                    t.insert((l, next), json.as_slice())
                        .map_err(|e| err(self, e))?;
                    next += 1;
                }
                let first_kept = next.saturating_sub(keep);
                if first_kept > 0 {
                    t.retain_in((l, 0)..(l, first_kept), |_, _| false)
                        .map_err(|e| err(self, e))?;
                }
            }
            wtx.commit().map_err(|e| err(self, e))
        })
    }

    /// Deletes the entries of `log` recorded before `before` (Unix
    /// seconds), from the oldest on, stopping at the first newer one (the
    /// log is in the order entries arrived, nearly that of their times).
    /// Returns how many went.
    pub fn prune_audit(&self, log: AuditLog, before: i64) -> Result<u64> {
        self.guard(|| {
            let l = log.key();
            let wtx = self.db()?.begin_write().map_err(|e| err(self, e))?;
            let mut gone = 0;
            {
                let mut t = wtx.open_table(AUDIT).map_err(|e| err(self, e))?;
                let mut last = None;
                for row in t.range((l, 0)..=(l, u64::MAX)).map_err(|e| err(self, e))? {
                    let (k, v) = row.map_err(|e| err(self, e))?;
                    let old = serde_json::from_slice::<AuditEntry>(v.value())
                        .map_or(true, |e| e.at < before);
                    if !old {
                        break;
                    }
                    last = Some(k.value().1);
                    gone += 1;
                }
                if let Some(last) = last {
                    t.retain_in((l, 0)..=(l, last), |_, _| false)
                        .map_err(|e| err(self, e))?;
                }
            }
            wtx.commit().map_err(|e| err(self, e))?;
            Ok(gone)
        })
    }

    /// The newest `limit` entries of `log`, oldest first. An entry that
    /// does not decode (a damaged or hand-edited file) is skipped.
    pub fn audit(&self, log: AuditLog, limit: usize) -> Result<Vec<AuditEntry>> {
        self.guard(|| {
            let l = log.key();
            let rtx = self.db()?.begin_read().map_err(|e| err(self, e))?;
            let t = match rtx.open_table(AUDIT) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(err(self, e)),
            };
            let mut out = Vec::new();
            for row in t
                .range((l, 0)..=(l, u64::MAX))
                .map_err(|e| err(self, e))?
                .rev()
                .take(limit)
            {
                let (_, v) = row.map_err(|e| err(self, e))?;
                if let Ok(e) = serde_json::from_slice::<AuditEntry>(v.value()) {
                    out.push(e);
                }
            }
            out.reverse();
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::store::StoreConfig;

    fn entry(i: i64) -> AuditEntry {
        AuditEntry {
            at: i,
            kind: "edit".into(),
            subject: format!("s{i}"),
            text: format!("edit {i}"),
            ..Default::default()
        }
    }

    #[test]
    fn pruning_drops_what_is_older_than_the_cutoff() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = Store::open(&dir.path().join("store.redb"), StoreConfig::default())?;
        let all: Vec<_> = (0..10).map(entry).collect();
        s.append_audit(AuditLog::Timeline, &all, 100)?;
        s.append_audit(AuditLog::Security, &all, 100)?;
        assert_eq!(s.prune_audit(AuditLog::Timeline, 4)?, 4);
        assert_eq!(
            s.audit(AuditLog::Timeline, 100)?,
            (4..10).map(entry).collect::<Vec<_>>()
        );
        assert_eq!(s.prune_audit(AuditLog::Timeline, 4)?, 0);
        assert_eq!(
            s.audit(AuditLog::Security, 100)?.len(),
            10,
            "the other log stays"
        );
        // Appending after a prune goes on after the last number kept.
        s.append_audit(AuditLog::Timeline, &[entry(10)], 100)?;
        assert_eq!(s.audit(AuditLog::Timeline, 100)?.last(), Some(&entry(10)));
        Ok(())
    }

    #[test]
    fn logs_survive_reopening_and_keep_their_newest() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.redb");
        {
            let s = Store::open(&path, StoreConfig::default())?;
            assert!(s.audit(AuditLog::Timeline, 10)?.is_empty());
            let first: Vec<_> = (0..4).map(entry).collect();
            s.append_audit(AuditLog::Timeline, &first, 5)?;
            let more: Vec<_> = (4..7).map(entry).collect();
            s.append_audit(AuditLog::Timeline, &more, 5)?;
            s.append_audit(AuditLog::Security, &[entry(100)], 5)?;
        }
        let s = Store::open(&path, StoreConfig::default())?;
        let t = s.audit(AuditLog::Timeline, 100)?;
        assert_eq!(t, (2..7).map(entry).collect::<Vec<_>>(), "the newest five");
        assert_eq!(s.audit(AuditLog::Timeline, 2)?, vec![entry(5), entry(6)]);
        assert_eq!(s.audit(AuditLog::Security, 100)?, vec![entry(100)]);
        Ok(())
    }
}
