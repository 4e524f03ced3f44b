//! The node's local time series of device readings, in the same redb file
//! as the documents but outside every CRDT: readings never sync.
//!
//! | table | key | value |
//! |---|---|---|
//! | `readings` | (series, time ms, sequence) | the value as JSON text |
//! | `readings_order` | sequence | (series, time ms): oldest first, for eviction |
//! | `meta` | `readings.next`, `readings.count`, `readings.dropped` | u64 |
//!
//! A series is `device/resource`. The table is capped by count: appending
//! beyond the cap drops the oldest readings of any series in the same
//! transaction, and counts what it dropped. Latest value: one reverse
//! range step; a time range: one forward range scan.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};
use crate::local::store::Store;

const READINGS: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("readings");
const ORDER: TableDefinition<u64, (&str, u64)> = TableDefinition::new("readings_order");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// One reading to store.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    /// `device/resource`.
    pub series: String,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// The value as JSON text.
    pub value: Vec<u8>,
}

/// How full the table is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReadingStats {
    /// Readings held.
    pub count: u64,
    /// Readings dropped to stay within the cap, ever.
    pub dropped: u64,
}

fn err(store: &Store, e: impl std::fmt::Display) -> Error {
    Error::Store {
        path: store.path().to_path_buf(),
        reason: e.to_string(),
    }
}

fn get_u64(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    k: &str,
) -> std::result::Result<u64, redb::StorageError> {
    Ok(t.get(k)?
        .map(|v| {
            let mut a = [0u8; 8];
            let b = v.value();
            if b.len() == 8 {
                a.copy_from_slice(b);
            }
            u64::from_be_bytes(a)
        })
        .unwrap_or(0))
}

impl Store {
    /// Appends readings in one transaction, dropping the oldest beyond
    /// `cap`. Returns how many it dropped.
    pub fn append_readings(&self, batch: &[Reading], cap: u64) -> Result<u64> {
        self.guard(|| {
            let wtx = self.db().begin_write().map_err(|e| err(self, e))?;
            let dropped_now;
            {
                let mut r = wtx.open_table(READINGS).map_err(|e| err(self, e))?;
                let mut o = wtx.open_table(ORDER).map_err(|e| err(self, e))?;
                let mut m = wtx.open_table(META).map_err(|e| err(self, e))?;
                let mut next = get_u64(&m, "readings.next").map_err(|e| err(self, e))?;
                let mut count = get_u64(&m, "readings.count").map_err(|e| err(self, e))?;
                let dropped = get_u64(&m, "readings.dropped").map_err(|e| err(self, e))?;
                for x in batch {
                    r.insert((x.series.as_str(), x.at_ms, next), x.value.as_slice())
                        .map_err(|e| err(self, e))?;
                    o.insert(next, (x.series.as_str(), x.at_ms))
                        .map_err(|e| err(self, e))?;
                    next += 1;
                    count += 1;
                }
                let mut gone = 0;
                while count > cap {
                    let Some((seq, key)) = o.pop_first().map_err(|e| err(self, e))? else {
                        break;
                    };
                    let seq = seq.value();
                    let (series, at) = key.value();
                    let series = series.to_string();
                    r.remove((series.as_str(), at, seq))
                        .map_err(|e| err(self, e))?;
                    count -= 1;
                    gone += 1;
                }
                m.insert("readings.next", next.to_be_bytes().as_slice())
                    .map_err(|e| err(self, e))?;
                m.insert("readings.count", count.to_be_bytes().as_slice())
                    .map_err(|e| err(self, e))?;
                m.insert(
                    "readings.dropped",
                    (dropped + gone).to_be_bytes().as_slice(),
                )
                .map_err(|e| err(self, e))?;
                dropped_now = gone;
            }
            wtx.commit().map_err(|e| err(self, e))?;
            Ok(dropped_now)
        })
    }

    /// The latest reading of a series: (time ms, value).
    pub fn latest_reading(&self, series: &str) -> Result<Option<(u64, Vec<u8>)>> {
        self.guard(|| {
            let rtx = self.db().begin_read().map_err(|e| err(self, e))?;
            let t = match rtx.open_table(READINGS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(err(self, e)),
            };
            let mut it = t
                .range((series, 0u64, 0u64)..=(series, u64::MAX, u64::MAX))
                .map_err(|e| err(self, e))?;
            match it.next_back() {
                Some(Ok((k, v))) => Ok(Some((k.value().1, v.value().to_vec()))),
                Some(Err(e)) => Err(err(self, e)),
                None => Ok(None),
            }
        })
    }

    /// Readings of a series in `[from_ms, to_ms]`, oldest first, at most `limit`.
    pub fn readings_between(
        &self,
        series: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        self.guard(|| {
            let rtx = self.db().begin_read().map_err(|e| err(self, e))?;
            let t = match rtx.open_table(READINGS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(err(self, e)),
            };
            let mut out = Vec::new();
            for item in t
                .range((series, from_ms, 0u64)..=(series, to_ms, u64::MAX))
                .map_err(|e| err(self, e))?
            {
                let (k, v) = item.map_err(|e| err(self, e))?;
                out.push((k.value().1, v.value().to_vec()));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// How many readings are held and how many were dropped.
    pub fn reading_stats(&self) -> Result<ReadingStats> {
        self.guard(|| {
            let rtx = self.db().begin_read().map_err(|e| err(self, e))?;
            let m = rtx.open_table(META).map_err(|e| err(self, e))?;
            Ok(ReadingStats {
                count: get_u64(&m, "readings.count").map_err(|e| err(self, e))?,
                dropped: get_u64(&m, "readings.dropped").map_err(|e| err(self, e))?,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::store::StoreConfig;

    fn r(series: &str, at: u64, v: f64) -> Reading {
        Reading {
            series: series.into(),
            at_ms: at,
            value: v.to_string().into_bytes(),
        }
    }

    #[test]
    fn capped_latest_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb"), StoreConfig::default()).unwrap();
        assert_eq!(s.latest_reading("d/a").unwrap(), None);
        let batch: Vec<Reading> = (0..10)
            .flat_map(|i| {
                [
                    r("d/a", 1000 + i, i as f64),
                    r("d/b", 1000 + i, -(i as f64)),
                ]
            })
            .collect();
        assert_eq!(s.append_readings(&batch, 15).unwrap(), 5);
        let st = s.reading_stats().unwrap();
        assert_eq!((st.count, st.dropped), (15, 5));
        assert_eq!(
            s.latest_reading("d/a").unwrap(),
            Some((1009, b"9".to_vec()))
        );
        assert_eq!(
            s.latest_reading("d/b").unwrap(),
            Some((1009, b"-9".to_vec()))
        );
        // The oldest went first, across both series.
        let a = s.readings_between("d/a", 0, u64::MAX, 100).unwrap();
        assert_eq!(a.first().map(|x| x.0), Some(1003), "a0 b0 a1 b1 a2 dropped");
        assert_eq!(s.readings_between("d/a", 1004, 1006, 100).unwrap().len(), 3);
        assert_eq!(s.readings_between("d/a", 1004, 1006, 2).unwrap().len(), 2);
        assert!(
            s.readings_between("d/ab", 0, u64::MAX, 10)
                .unwrap()
                .is_empty()
        );
        s.append_readings(&[r("d/a", 2000, 1.5)], 15).unwrap();
        assert_eq!(s.reading_stats().unwrap().dropped, 6);
    }
}
