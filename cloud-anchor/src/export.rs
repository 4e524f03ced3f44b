//! The exporter to PostgreSQL (`--readings-db postgres://…`, ADR 0010
//! point 7): what landed in the anchor's store is copied to one table,
//! idempotent on its key, from the store's export queue.
//!
//! ```sql
//! CREATE TABLE shoal_readings (
//!   node       text COLLATE "C" NOT NULL,
//!   series     text COLLATE "C" NOT NULL,
//!   time       timestamptz      NOT NULL,
//!   seq        bigint           NOT NULL,
//!   kind       smallint         NOT NULL,  -- 0 a record, 1 a summary of dropped ones
//!   value      double precision,           -- a number, or a summary's mean
//!   value_json jsonb,                      -- anything else, or the summary
//!   PRIMARY KEY (node, series, time, seq)
//! );
//! ```
//!
//! The names compare byte by byte (`COLLATE "C"`): the key's index is
//! then a memcmp away from a locale's collation rules, which cost the
//! exporter a third of its speed on a `en_US.UTF-8` database. The time is
//! in the key, so TimescaleDB takes the table as it is:
//! `SELECT create_hypertable('shoal_readings', 'time', migrate_data => true)`.
//!
//! Each round takes up to [`ROUND_BATCHES`] queued batches, `COPY`s their
//! records into a temporary table and moves them with `INSERT … SELECT`,
//! in one transaction, and only then takes the batches off the queue. A
//! row already in the table fails that insert (its key is unique); the
//! round then moves them with `ON CONFLICT DO NOTHING` instead, which
//! skips what is there (the plain insert is tried first because it is
//! twice as fast, and replays are rare). A crash between the two, a batch landed twice,
//! or the same batch exported by two anchor replicas writes nothing twice.
//! A database that is down stalls only this task: the queue waits in the
//! anchor's store, and nodes are acknowledged as before.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crdt_state::Store;
use futures::SinkExt;
use tokio::sync::Notify;
use uplink::batch::Kind;

/// Batches moved in one transaction, at most...
pub const ROUND_BATCHES: usize = 64;
/// ...and records (a round's rows are held in memory as `COPY` text, about
/// 60 bytes each).
pub const ROUND_RECORDS: u64 = 200_000;
/// First pause after an error; doubles up to a minute.
const RETRY: Duration = Duration::from_secs(1);

/// The table, made if missing.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS shoal_readings (
  node text COLLATE \"C\" NOT NULL,
  series text COLLATE \"C\" NOT NULL,
  time timestamptz NOT NULL,
  seq bigint NOT NULL,
  kind smallint NOT NULL,
  value double precision,
  value_json jsonb,
  PRIMARY KEY (node, series, time, seq)
)";

const STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS shoal_stage (
  node text COLLATE \"C\", series text COLLATE \"C\", time_ms bigint, seq bigint, kind smallint,
  value double precision, value_json jsonb
) ON COMMIT DELETE ROWS";

/// The rows, as they are: what a round does first. Twice as fast as
/// `ON CONFLICT` (PostgreSQL 15, this project's machines: 170,000 against
/// 80,000 rows a second), and a row already there makes it fail whole…
const MOVE: &str = "INSERT INTO shoal_readings (node, series, time, seq, kind, value, value_json)
  SELECT node, series, timestamptz 'epoch' + time_ms * interval '1 millisecond', seq, kind, value, value_json
  FROM shoal_stage";

/// …and then the round is done again this way, leaving out what is
/// there (a replay, a batch another replica copied, one queued twice).
const MOVE_SKIPPING: &str = "INSERT INTO shoal_readings (node, series, time, seq, kind, value, value_json)
  SELECT node, series, timestamptz 'epoch' + time_ms * interval '1 millisecond', seq, kind, value, value_json
  FROM shoal_stage ON CONFLICT DO NOTHING";

/// What the exporter did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches copied.
    pub batches: AtomicU64,
    /// Records copied (a replay counts again).
    pub records: AtomicU64,
    /// Rows that were new in the table.
    pub rows: AtomicU64,
    /// Rounds that failed (connection lost, database down).
    pub errors: AtomicU64,
    /// Rounds that found rows already there and skipped them.
    pub replayed: AtomicU64,
    /// Batches waiting in the queue after the last round.
    pub backlog: AtomicU64,
}

/// The exporter of one anchor.
pub struct Exporter {
    /// The database (`postgres://…`; what tokio-postgres takes).
    pub url: String,
    /// The anchor's store.
    pub store: Arc<Store>,
    /// Woken when a batch is queued.
    pub wake: Arc<Notify>,
    /// What it did.
    pub stats: Arc<Stats>,
}

impl Exporter {
    /// Runs until the process ends: connects, copies, and on any error
    /// waits and starts over.
    pub async fn run(self) {
        let mut pause = RETRY;
        loop {
            match self.session().await {
                Ok(()) => pause = RETRY,
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_s = pause.as_secs(), "export to PostgreSQL stalled");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// One connection: copies rounds until an error.
    async fn session(&self) -> Result<(), String> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| format!("--readings-db: {e}"))?;
        // A dead database or a half-open connection is given up in
        // minutes, not at the kernel's TCP timeout of hours.
        config
            .connect_timeout(Duration::from_secs(10))
            .keepalives_idle(Duration::from_secs(30))
            .options("-c statement_timeout=300000");
        let (mut client, conn) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let conn = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        let r = async {
            client
                .batch_execute(&format!("{SCHEMA}; {STAGE}"))
                .await
                .map_err(|e| format!("making the table: {e}"))?;
            tracing::info!("exporting data to PostgreSQL");
            loop {
                let store = self.store.clone();
                let queued = tokio::task::spawn_blocking(move || store.export_queue(ROUND_BATCHES))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                let Some(last) = queued.last().map(|q| q.0) else {
                    self.stats.backlog.store(0, Ordering::Relaxed);
                    // Woken by a landing; the timeout is a backstop.
                    let _ = tokio::time::timeout(Duration::from_secs(5), self.wake.notified()).await;
                    continue;
                };
                // Whole batches up to the round's records (at least one),
                // each decoded once.
                let (text, records, taken) = copy_text(&queued);
                let last = queued.get(taken.saturating_sub(1)).map_or(last, |q| q.0);
                let queued = &queued[..taken];
                let mut tx = client.transaction().await.map_err(|e| format!("begin: {e}"))?;
                let sink = tx
                    .copy_in::<_, std::io::Cursor<Vec<u8>>>(
                        "COPY shoal_stage (node, series, time_ms, seq, kind, value, value_json) FROM STDIN",
                    )
                    .await
                    .map_err(|e| format!("copy: {e}"))?;
                futures::pin_mut!(sink);
                sink.send(std::io::Cursor::new(text))
                    .await
                    .map_err(|e| format!("copy: {e}"))?;
                sink.finish().await.map_err(|e| format!("copy: {e}"))?;
                let rows = {
                    let plain = tx
                        .savepoint("plain")
                        .await
                        .map_err(|e| format!("savepoint: {e}"))?;
                    match plain.execute(MOVE, &[]).await {
                        Ok(n) => {
                            plain.commit().await.map_err(|e| format!("release: {e}"))?;
                            n
                        }
                        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                            plain.rollback().await.map_err(|e| format!("rollback: {e}"))?;
                            self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                            tx.execute(MOVE_SKIPPING, &[])
                                .await
                                .map_err(|e| format!("insert: {e}"))?
                        }
                        Err(e) => return Err(format!("insert: {e}")),
                    }
                };
                tx.commit().await.map_err(|e| format!("commit: {e}"))?;
                let store = self.store.clone();
                let backlog = tokio::task::spawn_blocking(move || {
                    store.exported(last)?;
                    store.export_backlog()
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                let s = &self.stats;
                s.batches.fetch_add(queued.len() as u64, Ordering::Relaxed);
                s.records.fetch_add(records, Ordering::Relaxed);
                s.rows.fetch_add(rows, Ordering::Relaxed);
                s.backlog.store(backlog, Ordering::Relaxed);
            }
        }
        .await;
        conn.abort();
        r
    }
}

/// Escapes a field of `COPY`'s text format. PostgreSQL's text holds no
/// NUL: one becomes U+FFFD (a series name or text value the node sent
/// with one would otherwise fail its round, and every round after it).
fn field(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        match b {
            0 => out.extend_from_slice("\u{fffd}".as_bytes()),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// The records of queued batches as `COPY` text rows (node, series,
/// time ms, seq, kind, value, value_json), and how many. A number goes in
/// `value`; anything else in `value_json` (text that is not JSON as a
/// JSON string, so one odd value cannot stall the export); a summary's
/// mean in `value` and the summary in `value_json`. A batch that no longer
/// decodes (the store was damaged) is skipped with a warning. Stops after
/// the batch that takes the round to [`ROUND_RECORDS`]; returns the text,
/// the records in it and how many batches it took (at least one).
pub fn copy_text(queued: &[(u64, String, Vec<u8>)]) -> (Vec<u8>, u64, usize) {
    let mut out = Vec::new();
    let mut n = 0u64;
    let mut taken = 0;
    for (number, node, bytes) in queued {
        if taken > 0 && n >= ROUND_RECORDS {
            break;
        }
        taken += 1;
        let batch = match uplink::batch::decode(bytes) {
            Ok(u) => u.batch,
            Err(e) => {
                tracing::warn!(queued = number, %node, error = %e, "a queued batch does not decode; skipped");
                continue;
            }
        };
        for s in &batch.series {
            for r in &s.records {
                let text = String::from_utf8_lossy(&r.value);
                // Most values are plain numbers: written as they came.
                let plain = s.kind == Kind::Reading
                    && text
                        .bytes()
                        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
                    && text.parse::<f64>().is_ok_and(f64::is_finite);
                let (value, value_json) = if plain {
                    (Some(text.to_string()), None)
                } else {
                    let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
                    let num = |x: Option<f64>| x.filter(|v| v.is_finite()).map(|v| v.to_string());
                    match (s.kind, &json) {
                        (Kind::Reading, Some(serde_json::Value::Number(x))) => {
                            (num(x.as_f64()), None)
                        }
                        (Kind::Reading, Some(v)) => (None, Some(v.to_string())),
                        (Kind::Reading, None) => (
                            None,
                            Some(serde_json::Value::from(text.as_ref()).to_string()),
                        ),
                        (Kind::Summary, Some(v)) => (num(v["mean"].as_f64()), Some(v.to_string())),
                        (Kind::Summary, None) => (None, None),
                    }
                };
                // jsonb refuses the escape of NUL as well.
                let value_json = value_json.map(|j| j.replace("\\u0000", "\\ufffd"));
                field(&mut out, node);
                out.push(b'\t');
                field(&mut out, &s.name);
                out.extend_from_slice(
                    format!(
                        "\t{}\t{}\t{}\t",
                        // Within PostgreSQL's timestamps (the anchor
                        // refuses later ones; this is a backstop).
                        r.at_ms.min(daemon::data::LATEST_MS),
                        r.seq.min(i64::MAX as u64),
                        u8::from(s.kind == Kind::Summary)
                    )
                    .as_bytes(),
                );
                match value {
                    Some(v) => out.extend_from_slice(v.as_bytes()),
                    None => out.extend_from_slice(b"\\N"),
                }
                out.push(b'\t');
                match value_json {
                    Some(j) => field(&mut out, &j),
                    None => out.extend_from_slice(b"\\N"),
                }
                out.push(b'\n');
                n += 1;
            }
        }
    }
    (out, n, taken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplink::batch::{Batch, Record, Series};

    /// Numbers, JSON, text that is not JSON and summaries each go in
    /// their column; tabs, newlines and backslashes are escaped; a batch
    /// that does not decode is skipped.
    #[test]
    fn copy_rows() {
        let rec = |seq, v: &str| Record {
            seq,
            at_ms: 1000 + seq,
            value: v.as_bytes().to_vec(),
        };
        let b = Batch {
            node: [7; 32],
            number: 1,
            series: vec![
                Series {
                    name: "m1/temp".into(),
                    kind: Kind::Reading,
                    records: vec![
                        rec(1, "21.5"),
                        rec(2, "true"),
                        rec(3, "{\"a\":\"x\\ty\"}"),
                        rec(4, "not json\\"),
                        rec(6, "\"nul \\u0000 here\""),
                    ],
                },
                Series {
                    name: "m1/temp".into(),
                    kind: Kind::Summary,
                    records: vec![rec(5, r#"{"count":2,"mean":3.5}"#)],
                },
            ],
        }
        .encode(|_| [0; 64])
        .unwrap();
        let (text, n, taken) =
            copy_text(&[(0, "n1".into(), b), (1, "n2".into(), b"junk".to_vec())]);
        assert_eq!(
            (n, taken),
            (6, 2),
            "both batches taken, the junk one skipped"
        );
        let text = String::from_utf8(text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "n1\tm1/temp\t1001\t1\t0\t21.5\t\\N");
        assert_eq!(lines[1], "n1\tm1/temp\t1002\t2\t0\t\\N\ttrue");
        assert_eq!(
            lines[2],
            "n1\tm1/temp\t1003\t3\t0\t\\N\t{\"a\":\"x\\\\ty\"}"
        );
        assert_eq!(
            lines[3],
            "n1\tm1/temp\t1004\t4\t0\t\\N\t\"not json\\\\\\\\\""
        );
        // jsonb takes no NUL: it becomes U+FFFD (escaped JSON, then the
        // backslash escaped for COPY).
        assert_eq!(
            lines[4],
            "n1\tm1/temp\t1006\t6\t0\t\\N\t\"nul \\\\ufffd here\""
        );
        assert_eq!(
            lines[5],
            "n1\tm1/temp\t1005\t5\t1\t3.5\t{\"count\":2,\"mean\":3.5}"
        );
    }
}
