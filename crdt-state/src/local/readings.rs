//! The node's local time series of device readings (and of the records
//! its apps post), in the same redb file as the documents but outside
//! every CRDT: readings never sync. They go up to an anchor in batches
//! (ADR 0010), and this table is also their outbox.
//!
//! | table | key | value |
//! |---|---|---|
//! | `readings` | (series, time ms, sequence) | the value as JSON text |
//! | `readings_order` | sequence | (series, time ms) of a reading no anchor has acknowledged yet: the outbox, oldest first |
//! | `readings_acked` | sequence | (series, time ms) of an acknowledged reading |
//! | `readings_summaries` | sequence | (series, interval start ms, summary JSON) of unacknowledged readings the cap dropped, not acknowledged yet |
//! | `meta` | `readings.next`, `.count`, `.unacked`, `.dropped`, `.summarised` | u64 |
//!
//! A series is `device/resource`. The table is capped by count: appending
//! beyond the cap drops acknowledged readings first (they are safe at an
//! anchor), oldest first, and only then the oldest unacknowledged ones; a
//! node whose readings go up folds each of those, in the same transaction,
//! into a summary of its series and interval (count, min, max, mean, first
//! and last time) that goes up in its place. Every reading and summary has a sequence number from
//! `readings.next`, never reused: what names it up to the anchor.
//! Latest value: one reverse range step; a time range: one forward range
//! scan; the outbox: a forward scan from a sequence number.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};
use crate::local::store::Store;

const READINGS: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("readings");
const ORDER: TableDefinition<u64, (&str, u64)> = TableDefinition::new("readings_order");
const ACKED: TableDefinition<u64, (&str, u64)> = TableDefinition::new("readings_acked");
const SUMMARIES: TableDefinition<u64, (&str, u64, &[u8])> =
    TableDefinition::new("readings_summaries");

/// Interval of the summaries of dropped readings, by default.
pub const SUMMARY_MS: u64 = 60_000;
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
    /// Readings held that no anchor has acknowledged (the backlog).
    pub unacked: u64,
    /// Unacknowledged readings the cap dropped, ever (each counted in a
    /// summary that goes up instead).
    pub summarised: u64,
    /// Time of the oldest unacknowledged reading.
    pub oldest_unacked_ms: Option<u64>,
}

/// One entry of the outbox: a reading, or a summary of dropped ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    /// Its sequence number.
    pub seq: u64,
    /// Its series.
    pub series: String,
    /// Its time (a summary: the start of its interval).
    pub at_ms: u64,
    /// The value as JSON text (a summary: an object of `count`, `min`,
    /// `max`, `mean`, `first_ms`, `last_ms`).
    pub value: Vec<u8>,
    /// Whether it is a summary of dropped readings.
    pub summary: bool,
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

/// Readings in the outbox. A store from before the outbox existed counts
/// every reading it holds as unacknowledged (they all are), once.
fn unacked_count(
    m: &impl ReadableTable<&'static str, &'static [u8]>,
    o: &impl ReadableTable<u64, (&'static str, u64)>,
) -> std::result::Result<u64, redb::StorageError> {
    if m.get("readings.unacked")?.is_some() {
        return get_u64(m, "readings.unacked");
    }
    o.len()
}

/// What a summary of dropped readings says.
#[derive(Default)]
struct Summary {
    count: u64,
    numbers: u64,
    min: f64,
    max: f64,
    sum: f64,
    first_ms: u64,
    last_ms: u64,
}

impl Summary {
    fn add(&mut self, at: u64, value: &[u8]) {
        if self.count == 0 || at < self.first_ms {
            self.first_ms = at;
        }
        if self.count == 0 || at > self.last_ms {
            self.last_ms = at;
        }
        self.count += 1;
        let v = std::str::from_utf8(value)
            .ok()
            .and_then(|t| t.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite());
        if let Some(v) = v {
            if self.numbers == 0 {
                (self.min, self.max) = (v, v);
            }
            self.min = self.min.min(v);
            self.max = self.max.max(v);
            self.sum += v;
            self.numbers += 1;
        }
    }

    fn json(&self) -> Vec<u8> {
        let mut o = serde_json::json!({
            "count": self.count,
            "first_ms": self.first_ms,
            "last_ms": self.last_ms,
        });
        if self.numbers > 0 {
            o["min"] = self.min.into();
            o["max"] = self.max.into();
            o["mean"] = (self.sum / self.numbers as f64).into();
        }
        o.to_string().into_bytes()
    }
}

impl Store {
    /// Appends readings in one transaction, dropping the oldest beyond
    /// `cap` (acknowledged ones first), with no summaries: for a node whose
    /// readings do not go up. Returns how many it dropped.
    pub fn append_readings(&self, batch: &[Reading], cap: u64) -> Result<u64> {
        self.append_readings_with(batch, cap, None)
    }

    /// [`Store::append_readings`], the unacknowledged readings it drops
    /// summarised in intervals of `summary_ms` (by default [`SUMMARY_MS`])
    /// when it is `Some`: for a node whose readings go up.
    pub fn append_readings_with(
        &self,
        batch: &[Reading],
        cap: u64,
        summary_ms: Option<u64>,
    ) -> Result<u64> {
        self.guard(|| {
            let wtx = self.db()?.begin_write().map_err(|e| err(self, e))?;
            let dropped_now;
            {
                let mut r = wtx.open_table(READINGS).map_err(|e| err(self, e))?;
                let mut o = wtx.open_table(ORDER).map_err(|e| err(self, e))?;
                let mut a = wtx.open_table(ACKED).map_err(|e| err(self, e))?;
                let mut sm = wtx.open_table(SUMMARIES).map_err(|e| err(self, e))?;
                let mut m = wtx.open_table(META).map_err(|e| err(self, e))?;
                let mut next = get_u64(&m, "readings.next").map_err(|e| err(self, e))?;
                let mut count = get_u64(&m, "readings.count").map_err(|e| err(self, e))?;
                let dropped = get_u64(&m, "readings.dropped").map_err(|e| err(self, e))?;
                let mut unacked = unacked_count(&m, &o).map_err(|e| err(self, e))?;
                let mut summarised =
                    get_u64(&m, "readings.summarised").map_err(|e| err(self, e))?;
                for x in batch {
                    r.insert((x.series.as_str(), x.at_ms, next), x.value.as_slice())
                        .map_err(|e| err(self, e))?;
                    o.insert(next, (x.series.as_str(), x.at_ms))
                        .map_err(|e| err(self, e))?;
                    next += 1;
                    count += 1;
                    unacked += 1;
                }
                let mut gone = 0;
                // Acknowledged readings first: an anchor has them.
                while count > cap {
                    let Some((seq, key)) = a.pop_first().map_err(|e| err(self, e))? else {
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
                // Then the oldest unacknowledged, each into its summary.
                let mut open: std::collections::HashMap<(String, u64), (u64, Summary)> =
                    std::collections::HashMap::new();
                while count > cap {
                    let Some((seq, key)) = o.pop_first().map_err(|e| err(self, e))? else {
                        break;
                    };
                    let seq = seq.value();
                    let (series, at) = key.value();
                    let series = series.to_string();
                    let value = r
                        .remove((series.as_str(), at, seq))
                        .map_err(|e| err(self, e))?
                        .map(|v| v.value().to_vec())
                        .unwrap_or_default();
                    count -= 1;
                    unacked = unacked.saturating_sub(1);
                    gone += 1;
                    let Some(every) = summary_ms else { continue };
                    let bucket = at - at % every.max(1);
                    let entry = open.entry((series, bucket)).or_insert_with(|| {
                        let s = next;
                        next += 1;
                        (s, Summary::default())
                    });
                    entry.1.add(at, &value);
                    summarised += 1;
                }
                for ((series, bucket), (seq, summary)) in open {
                    sm.insert(seq, (series.as_str(), bucket, summary.json().as_slice()))
                        .map_err(|e| err(self, e))?;
                }
                for (k, v) in [
                    ("readings.next", next),
                    ("readings.count", count),
                    ("readings.dropped", dropped + gone),
                    ("readings.unacked", unacked),
                    ("readings.summarised", summarised),
                ] {
                    m.insert(k, v.to_be_bytes().as_slice())
                        .map_err(|e| err(self, e))?;
                }
                dropped_now = gone;
            }
            wtx.commit().map_err(|e| err(self, e))?;
            Ok(dropped_now)
        })
    }

    /// The outbox from sequence number `from` on: readings and summaries
    /// no anchor has acknowledged, by sequence number, at most `limit`.
    pub fn outbox(&self, from: u64, limit: usize) -> Result<Vec<Outgoing>> {
        self.guard(|| {
            let rtx = self.db()?.begin_read().map_err(|e| err(self, e))?;
            let (o, r) = match (rtx.open_table(ORDER), rtx.open_table(READINGS)) {
                (Ok(o), Ok(r)) => (o, r),
                (Err(redb::TableError::TableDoesNotExist(_)), _)
                | (_, Err(redb::TableError::TableDoesNotExist(_))) => return Ok(Vec::new()),
                (Err(e), _) | (_, Err(e)) => return Err(err(self, e)),
            };
            let mut out: Vec<Outgoing> = Vec::new();
            for item in o.range(from..).map_err(|e| err(self, e))? {
                let (seq, key) = item.map_err(|e| err(self, e))?;
                let (seq, (series, at)) = (seq.value(), key.value());
                let value = r
                    .get((series, at, seq))
                    .map_err(|e| err(self, e))?
                    .map(|v| v.value().to_vec())
                    .unwrap_or_default();
                out.push(Outgoing {
                    seq,
                    series: series.to_string(),
                    at_ms: at,
                    value,
                    summary: false,
                });
                if out.len() >= limit {
                    break;
                }
            }
            // The `limit` first of both, merged: the `limit` first of all.
            match rtx.open_table(SUMMARIES) {
                Ok(t) => {
                    for item in t.range(from..).map_err(|e| err(self, e))?.take(limit) {
                        let (seq, v) = item.map_err(|e| err(self, e))?;
                        let seq = seq.value();
                        let (series, at, json) = v.value();
                        out.push(Outgoing {
                            seq,
                            series: series.to_string(),
                            at_ms: at,
                            value: json.to_vec(),
                            summary: true,
                        });
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(err(self, e)),
            }
            out.sort_by_key(|x| x.seq);
            out.truncate(limit);
            Ok(out)
        })
    }

    /// Marks what an anchor acknowledged (inclusive ranges of sequence
    /// numbers): its readings are dropped first from now on, its summaries
    /// are gone. Acknowledging twice, or what is not here, changes nothing.
    pub fn acknowledge(&self, ranges: &[(u64, u64)]) -> Result<u64> {
        self.guard(|| {
            let wtx = self.db()?.begin_write().map_err(|e| err(self, e))?;
            let mut moved = 0u64;
            {
                let mut o = wtx.open_table(ORDER).map_err(|e| err(self, e))?;
                let mut a = wtx.open_table(ACKED).map_err(|e| err(self, e))?;
                let mut sm = wtx.open_table(SUMMARIES).map_err(|e| err(self, e))?;
                let mut m = wtx.open_table(META).map_err(|e| err(self, e))?;
                let mut unacked = unacked_count(&m, &o).map_err(|e| err(self, e))?;
                for &(lo, hi) in ranges {
                    if hi < lo {
                        continue;
                    }
                    let taken: Vec<(u64, String, u64)> = o
                        .extract_from_if(lo..=hi, |_, _| true)
                        .map_err(|e| err(self, e))?
                        .map(|item| {
                            item.map(|(k, v)| {
                                let (series, at) = v.value();
                                (k.value(), series.to_string(), at)
                            })
                        })
                        .collect::<std::result::Result<_, _>>()
                        .map_err(|e| err(self, e))?;
                    for (seq, series, at) in taken {
                        a.insert(seq, (series.as_str(), at))
                            .map_err(|e| err(self, e))?;
                        moved += 1;
                        unacked = unacked.saturating_sub(1);
                    }
                    sm.retain_in(lo..=hi, |_, _| false)
                        .map_err(|e| err(self, e))?;
                }
                m.insert("readings.unacked", unacked.to_be_bytes().as_slice())
                    .map_err(|e| err(self, e))?;
            }
            wtx.commit().map_err(|e| err(self, e))?;
            Ok(moved)
        })
    }

    /// The latest reading of a series: (time ms, value).
    pub fn latest_reading(&self, series: &str) -> Result<Option<(u64, Vec<u8>)>> {
        self.guard(|| {
            let rtx = self.db()?.begin_read().map_err(|e| err(self, e))?;
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
            let rtx = self.db()?.begin_read().map_err(|e| err(self, e))?;
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

    /// The newest sequence number given to a reading or summary (`None`:
    /// none ever).
    pub fn readings_newest(&self) -> Result<Option<u64>> {
        self.guard(|| {
            let rtx = self.db()?.begin_read().map_err(|e| err(self, e))?;
            let m = match rtx.open_table(META) {
                Ok(m) => m,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(err(self, e)),
            };
            let next = get_u64(&m, "readings.next").map_err(|e| err(self, e))?;
            Ok(next.checked_sub(1))
        })
    }

    /// How many readings are held and how many were dropped.
    pub fn reading_stats(&self) -> Result<ReadingStats> {
        self.guard(|| {
            let rtx = self.db()?.begin_read().map_err(|e| err(self, e))?;
            let m = rtx.open_table(META).map_err(|e| err(self, e))?;
            let (unacked, oldest_unacked_ms) = match rtx.open_table(ORDER) {
                Ok(o) => (
                    unacked_count(&m, &o).map_err(|e| err(self, e))?,
                    o.first()
                        .map_err(|e| err(self, e))?
                        .map(|(_, v)| v.value().1),
                ),
                Err(redb::TableError::TableDoesNotExist(_)) => (0, None),
                Err(e) => return Err(err(self, e)),
            };
            Ok(ReadingStats {
                count: get_u64(&m, "readings.count").map_err(|e| err(self, e))?,
                dropped: get_u64(&m, "readings.dropped").map_err(|e| err(self, e))?,
                unacked,
                summarised: get_u64(&m, "readings.summarised").map_err(|e| err(self, e))?,
                oldest_unacked_ms,
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

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb"), StoreConfig::default()).unwrap();
        (dir, s)
    }

    /// The outbox holds every reading until an anchor acknowledges it, in
    /// sequence order from any point; acknowledging twice changes nothing.
    #[test]
    fn the_outbox_keeps_what_no_anchor_acknowledged() {
        let (_d, s) = store();
        assert_eq!(s.readings_newest().unwrap(), None);
        let batch: Vec<Reading> = (0..6).map(|i| r("d/a", 1000 + i, i as f64)).collect();
        s.append_readings(&batch, 100).unwrap();
        assert_eq!(s.readings_newest().unwrap(), Some(5));
        let all = s.outbox(0, 100).unwrap();
        assert_eq!(
            all.iter().map(|o| o.seq).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5]
        );
        let later: Vec<u64> = s.outbox(4, 10).unwrap().iter().map(|o| o.seq).collect();
        assert_eq!(later, [4, 5]);
        assert!(s.outbox(6, 10).unwrap().is_empty());
        assert_eq!(all[1].value, b"1");
        assert!(!all[0].summary);
        let st = s.reading_stats().unwrap();
        assert_eq!((st.unacked, st.oldest_unacked_ms), (6, Some(1000)));
        assert_eq!(s.acknowledge(&[(0, 2), (4, 4)]).unwrap(), 4);
        assert_eq!(
            s.acknowledge(&[(0, 2), (9, 3)]).unwrap(),
            0,
            "twice, or backwards"
        );
        let left: Vec<u64> = s.outbox(0, 100).unwrap().iter().map(|o| o.seq).collect();
        assert_eq!(left, [3, 5]);
        let st = s.reading_stats().unwrap();
        assert_eq!(
            (st.unacked, st.oldest_unacked_ms, st.count),
            (2, Some(1003), 6)
        );
        assert_eq!(s.outbox(0, 1).unwrap().len(), 1);
    }

    /// Over the cap, acknowledged readings go first; only then the oldest
    /// unacknowledged ones, folded into summaries per series and interval
    /// that go up instead, so that kept and summarised add up to what was
    /// produced.
    #[test]
    fn the_cap_drops_what_is_safe_first_and_summarises_the_rest() {
        let (_d, s) = store();
        // 0..10: d/a values 0..9 a second apart from t=60 s.
        let a: Vec<Reading> = (0..10)
            .map(|i| r("d/a", 60_000 + i * 1000, i as f64))
            .collect();
        s.append_readings(&a, 100).unwrap();
        s.acknowledge(&[(0, 3)]).unwrap();
        // 10 more over a cap of 12: 8 must go, 4 acknowledged ones first.
        let b: Vec<Reading> = (0..10)
            .map(|i| r("d/b", 120_000 + i * 1000, 100.0 + i as f64))
            .collect();
        assert_eq!(s.append_readings_with(&b, 12, Some(SUMMARY_MS)).unwrap(), 8);
        let st = s.reading_stats().unwrap();
        assert_eq!((st.count, st.dropped, st.summarised), (12, 8, 4));
        // The acknowledged 0..=3 are gone from the table, 4..=7 were
        // summarised: one summary (all in the minute from 60 s).
        let d_a = s.readings_between("d/a", 0, u64::MAX, 100).unwrap();
        assert_eq!(d_a.first().map(|x| x.0), Some(68_000));
        let out = s.outbox(0, 100).unwrap();
        let sums: Vec<&Outgoing> = out.iter().filter(|o| o.summary).collect();
        assert_eq!(sums.len(), 1);
        assert_eq!((sums[0].series.as_str(), sums[0].at_ms), ("d/a", 60_000));
        let v: serde_json::Value = serde_json::from_slice(&sums[0].value).unwrap();
        assert_eq!(v["count"], 4);
        assert_eq!(
            (v["min"].as_f64(), v["max"].as_f64(), v["mean"].as_f64()),
            (Some(4.0), Some(7.0), Some(5.5))
        );
        assert_eq!(
            (v["first_ms"].as_u64(), v["last_ms"].as_u64()),
            (Some(64_000), Some(67_000))
        );
        // Produced 20: kept 12 + summarised 4 + acknowledged and dropped 4.
        let readings_out = out.iter().filter(|o| !o.summary).count() as u64;
        assert_eq!(readings_out, st.unacked);
        assert_eq!(
            st.count - st.unacked,
            0,
            "every acknowledged one was dropped"
        );
        assert_eq!(st.unacked + st.summarised + 4, 20);
        // The summary has its own sequence number, after the readings of
        // the batch that caused it; acknowledging it removes it.
        assert!(sums[0].seq >= 20);
        s.acknowledge(&[(sums[0].seq, sums[0].seq)]).unwrap();
        assert!(s.outbox(0, 100).unwrap().iter().all(|o| !o.summary));
    }
}
