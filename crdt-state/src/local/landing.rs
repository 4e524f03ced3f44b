//! What an anchor keeps of the data that came up from the nodes (ADR 0010
//! point 7), in the same redb file as its documents and outside every
//! CRDT.
//!
//! | table | key | value |
//! |---|---|---|
//! | `data_series` | (node, series) | its number (u32) |
//! | `data` | (series number, time ms, sequence) | (kind, the value as JSON text) |
//! | `data_export` | number | (node, the batch as it came): what the exporter to PostgreSQL has not copied yet |
//! | `meta` | `data.series.next` (u32), `data.export.next` (u64) | the next numbers |
//!
//! A record is named by (node, series, sequence); the time is in the key
//! so a range of a series is one scan, and retention deletes each series'
//! oldest range. Numbering the series keeps a row at about 60 bytes (the
//! names in every key took 285, with a second table by time). Writing a
//! record that is already here writes nothing, so a batch that comes twice
//! (a lost acknowledgement, a node that switched anchors) counts once.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::error::{Error, Result};
use crate::local::store::Store;

const SERIES: TableDefinition<(&str, &str), u32> = TableDefinition::new("data_series");
const DATA: TableDefinition<(u32, u64, u64), (u8, &[u8])> = TableDefinition::new("data");
const EXPORT: TableDefinition<u64, (&str, &[u8])> = TableDefinition::new("data_export");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// One record that came up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Landed {
    /// Its series.
    pub series: String,
    /// Its sequence number on its node.
    pub seq: u64,
    /// Its time (ms; a summary: the start of its interval).
    pub at_ms: u64,
    /// 0 a record as made, 1 a summary of dropped ones.
    pub kind: u8,
    /// The value as JSON text.
    pub value: Vec<u8>,
}

fn err(store: &Store, e: impl std::fmt::Display) -> Error {
    Error::Store {
        path: store.path().to_path_buf(),
        reason: e.to_string(),
    }
}

impl Store {
    /// Stores what `node` sent, in one transaction; a record already here
    /// is left as it is. With `export`, the batch as it came (`bytes`) is
    /// queued in the same transaction for the exporter
    /// ([`Store::export_queue`]). Returns how many records were new.
    pub fn land(&self, node: &str, records: &[Landed], export: Option<&[u8]>) -> Result<u64> {
        self.guard(|| {
            let wtx = self.db()?.begin_write().map_err(|e| err(self, e))?;
            let mut new = 0;
            {
                let mut names = wtx.open_table(SERIES).map_err(|e| err(self, e))?;
                let mut d = wtx.open_table(DATA).map_err(|e| err(self, e))?;
                let mut m = wtx.open_table(META).map_err(|e| err(self, e))?;
                let mut next = m
                    .get("data.series.next")
                    .map_err(|e| err(self, e))?
                    .and_then(|v| v.value().try_into().ok().map(u32::from_be_bytes))
                    .unwrap_or(0);
                let mut ids: std::collections::HashMap<&str, u32> = Default::default();
                for r in records {
                    let id = match ids.get(r.series.as_str()) {
                        Some(id) => *id,
                        None => {
                            let found = names
                                .get((node, r.series.as_str()))
                                .map_err(|e| err(self, e))?
                                .map(|v| v.value());
                            let id = match found {
                                Some(id) => id,
                                None => {
                                    let id = next;
                                    next = next
                                        .checked_add(1)
                                        .ok_or_else(|| err(self, "more than 4 billion series"))?;
                                    names
                                        .insert((node, r.series.as_str()), id)
                                        .map_err(|e| err(self, e))?;
                                    id
                                }
                            };
                            ids.insert(r.series.as_str(), id);
                            id
                        }
                    };
                    let key = (id, r.at_ms, r.seq);
                    if d.get(key).map_err(|e| err(self, e))?.is_some() {
                        continue;
                    }
                    d.insert(key, (r.kind, r.value.as_slice()))
                        .map_err(|e| err(self, e))?;
                    new += 1;
                }
                m.insert("data.series.next", next.to_be_bytes().as_slice())
                    .map_err(|e| err(self, e))?;
                // A batch with nothing new was queued when it first came
                // (or before the export was set up, which copies only what
                // lands from then on).
                if let Some(bytes) = export.filter(|_| new > 0) {
                    let mut q = wtx.open_table(EXPORT).map_err(|e| err(self, e))?;
                    let number = m
                        .get("data.export.next")
                        .map_err(|e| err(self, e))?
                        .and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes))
                        .unwrap_or(0);
                    q.insert(number, (node, bytes)).map_err(|e| err(self, e))?;
                    m.insert("data.export.next", (number + 1).to_be_bytes().as_slice())
                        .map_err(|e| err(self, e))?;
                }
            }
            wtx.commit().map_err(|e| err(self, e))?;
            Ok(new)
        })
    }

    /// The series of `node` that hold data (by name).
    pub fn landed_series(&self, node: &str) -> Result<Vec<String>> {
        self.guard(|| {
            let rtx = self.db()?.begin_read().map_err(|e| err(self, e))?;
            let names = match rtx.open_table(SERIES) {
                Ok(n) => n,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(err(self, e)),
            };
            let mut out = Vec::new();
            for item in names.range((node, "")..).map_err(|e| err(self, e))? {
                let (k, _) = item.map_err(|e| err(self, e))?;
                let (n, series) = k.value();
                if n != node {
                    break;
                }
                out.push(series.to_string());
            }
            Ok(out)
        })
    }

    /// The oldest batches queued for export, at most `limit`: (number,
    /// node, the batch's bytes).
    pub fn export_queue(&self, limit: usize) -> Result<Vec<(u64, String, Vec<u8>)>> {
        self.guard(|| {
            let rtx = self.db()?.begin_read().map_err(|e| err(self, e))?;
            let q = match rtx.open_table(EXPORT) {
                Ok(q) => q,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(err(self, e)),
            };
            q.iter()
                .map_err(|e| err(self, e))?
                .take(limit)
                .map(|item| {
                    item.map(|(k, v)| {
                        let (node, bytes) = v.value();
                        (k.value(), node.to_string(), bytes.to_vec())
                    })
                    .map_err(|e| err(self, e))
                })
                .collect()
        })
    }

    /// The exporter copied every batch up to `through`: they leave the
    /// queue.
    pub fn exported(&self, through: u64) -> Result<()> {
        self.guard(|| {
            let wtx = self.db()?.begin_write().map_err(|e| err(self, e))?;
            {
                let mut q = wtx.open_table(EXPORT).map_err(|e| err(self, e))?;
                q.retain_in(..=through, |_, _| false)
                    .map_err(|e| err(self, e))?;
            }
            wtx.commit().map_err(|e| err(self, e))?;
            Ok(())
        })
    }

    /// Batches waiting for the exporter.
    pub fn export_backlog(&self) -> Result<u64> {
        self.guard(|| {
            let rtx = self.db()?.begin_read().map_err(|e| err(self, e))?;
            match rtx.open_table(EXPORT) {
                Ok(q) => q.len().map_err(|e| err(self, e)),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(e) => Err(err(self, e)),
            }
        })
    }

    /// Records of `node`'s `series` in `[from_ms, to_ms]`, by time (then
    /// sequence), at most `limit`.
    pub fn landed(
        &self,
        node: &str,
        series: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<Landed>> {
        self.guard(|| {
            let rtx = self.db()?.begin_read().map_err(|e| err(self, e))?;
            let (names, d) = match (rtx.open_table(SERIES), rtx.open_table(DATA)) {
                (Ok(n), Ok(d)) => (n, d),
                (Err(redb::TableError::TableDoesNotExist(_)), _)
                | (_, Err(redb::TableError::TableDoesNotExist(_))) => return Ok(Vec::new()),
                (Err(e), _) | (_, Err(e)) => return Err(err(self, e)),
            };
            let Some(id) = names
                .get((node, series))
                .map_err(|e| err(self, e))?
                .map(|v| v.value())
            else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for item in d
                .range((id, from_ms, 0u64)..=(id, to_ms, u64::MAX))
                .map_err(|e| err(self, e))?
            {
                let (k, v) = item.map_err(|e| err(self, e))?;
                let (_, at, seq) = k.value();
                let (kind, value) = v.value();
                out.push(Landed {
                    series: series.to_string(),
                    seq,
                    at_ms: at,
                    kind,
                    value: value.to_vec(),
                });
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Deletes records older than `before_ms` (retention), at most about
    /// `limit` in one transaction (a tick's worth). Returns how many it
    /// deleted.
    pub fn prune_landed(&self, before_ms: u64, limit: usize) -> Result<u64> {
        self.guard(|| {
            let wtx = self.db()?.begin_write().map_err(|e| err(self, e))?;
            let mut gone = 0u64;
            {
                let names = match wtx.open_table(SERIES) {
                    Ok(n) => n,
                    Err(e) => return Err(err(self, e)),
                };
                let ids: Vec<u32> = names
                    .iter()
                    .map_err(|e| err(self, e))?
                    .map(|item| item.map(|(_, v)| v.value()))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| err(self, e))?;
                let mut d = wtx.open_table(DATA).map_err(|e| err(self, e))?;
                for id in ids {
                    if gone >= limit as u64 || before_ms == 0 {
                        break;
                    }
                    let old: Vec<(u64, u64)> = d
                        .range((id, 0u64, 0u64)..=(id, before_ms - 1, u64::MAX))
                        .map_err(|e| err(self, e))?
                        .take(limit - gone as usize)
                        .map(|item| item.map(|(k, _)| (k.value().1, k.value().2)))
                        .collect::<std::result::Result<_, _>>()
                        .map_err(|e| err(self, e))?;
                    for (at, seq) in old {
                        d.remove((id, at, seq)).map_err(|e| err(self, e))?;
                        gone += 1;
                    }
                }
            }
            wtx.commit().map_err(|e| err(self, e))?;
            Ok(gone)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::store::StoreConfig;

    fn rec(series: &str, seq: u64, at: u64, v: &str) -> Landed {
        Landed {
            series: series.into(),
            seq,
            at_ms: at,
            kind: 0,
            value: v.as_bytes().to_vec(),
        }
    }

    /// A batch that lands twice counts once; ranges are per node and
    /// series; retention deletes by time, oldest first.
    #[test]
    fn landing_is_idempotent_ranged_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("a.redb"), StoreConfig::default()).unwrap();
        let batch: Vec<Landed> = (0..10)
            .map(|i| rec("m/v", i, 1000 + i * 10, &i.to_string()))
            .collect();
        assert_eq!(s.land("n1", &batch[..9], None).unwrap(), 9);
        assert_eq!(s.land("n1", &batch, Some(b"b1")).unwrap(), 1, "one new");
        assert_eq!(
            s.land("n1", &batch, Some(b"b0")).unwrap(),
            0,
            "again: nothing new, not queued"
        );
        assert_eq!(
            s.land("n2", &batch[..3], Some(b"b2")).unwrap(),
            3,
            "another node's"
        );
        let got = s.landed("n1", "m/v", 1020, 1050, 100).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3, 4, 5]);
        assert_eq!(got[0].value, b"2");
        assert!(s.landed("n1", "m/w", 0, u64::MAX, 100).unwrap().is_empty());
        assert_eq!(s.landed("n2", "m/v", 0, u64::MAX, 100).unwrap().len(), 3);
        assert_eq!(s.landed_series("n1").unwrap(), ["m/v"]);
        assert!(s.landed_series("n").unwrap().is_empty());
        assert!(s.landed_series("n3").unwrap().is_empty());
        assert_eq!(s.landed("n1", "m/v", 0, u64::MAX, 2).unwrap().len(), 2);
        // Retention: everything before 1035 goes, in two ticks of 5.
        assert_eq!(s.prune_landed(1035, 5).unwrap(), 5);
        assert_eq!(s.prune_landed(1035, 5).unwrap(), 2);
        assert_eq!(s.prune_landed(1035, 5).unwrap(), 0);
        let left = s.landed("n1", "m/v", 0, u64::MAX, 100).unwrap();
        assert_eq!(left.first().map(|r| r.at_ms), Some(1040));
        assert!(s.landed("n2", "m/v", 0, u64::MAX, 100).unwrap().is_empty());
        // Landing a pruned record again brings it back (its node resent
        // it): retention is by time, not a tombstone.
        assert_eq!(s.land("n1", &batch[..1], None).unwrap(), 1);
        // The export queue holds the two batches landed with one, in
        // order, until the exporter says they are copied.
        let q = s.export_queue(10).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!((q[0].1.as_str(), q[0].2.as_slice()), ("n1", &b"b1"[..]));
        assert_eq!((q[1].1.as_str(), q[1].2.as_slice()), ("n2", &b"b2"[..]));
        assert_eq!(s.export_backlog().unwrap(), 2);
        s.exported(q[0].0).unwrap();
        let q2 = s.export_queue(10).unwrap();
        assert_eq!(q2.len(), 1);
        assert_eq!(q2[0].0, q[1].0);
        s.exported(q[1].0).unwrap();
        assert_eq!(s.export_backlog().unwrap(), 0);
    }
}
