//! A series as the operator API serves it (`GET
//! /api/nodes/{node}/series/{series}`): the records that landed in a time
//! range, as points or per step, the summaries a node sent for what its
//! quota made it drop, and the gaps between, so a chart can draw a line,
//! a coarse band where readings were summarised, and a marker where
//! nothing is known.

use crdt_state::local::landing::Landed;
use serde::Serialize;
use serde_json::Value;

/// Most records read for one answer.
pub const MAX_RECORDS: usize = 200_000;
/// Most points in one answer with a step.
pub const MAX_POINTS: u64 = 10_000;

/// One point: a record (no step), or what a step's records say.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Point {
    /// Time (ms): the record's, or the start of the step.
    pub t: u64,
    /// The value (a step: the mean of its numbers).
    pub v: Value,
    /// With a step: how many records, and their least and greatest
    /// numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Least.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Greatest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// A stretch the node summarised (its quota dropped the readings).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Start of its interval (ms).
    pub t: u64,
    /// What it says: count, min, max, mean, first_ms, last_ms.
    pub summary: Value,
}

/// A stretch with no record, longer than the series' rhythm.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Gap {
    /// Last record before (ms).
    pub from: u64,
    /// First record after (ms).
    pub to: u64,
    /// Whether summaries cover some of it (downsampled, not lost).
    pub summarised: bool,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Answer {
    /// The node.
    pub node: String,
    /// The series.
    pub series: String,
    /// The range asked (ms).
    pub from: u64,
    /// End of it.
    pub to: u64,
    /// The step (ms; 0: every record).
    pub step: u64,
    /// Records in the range (summaries not counted).
    pub records: u64,
    /// Points, by time.
    pub points: Vec<Point>,
    /// Summaries, by time.
    pub summaries: Vec<Summary>,
    /// Gaps, by time.
    pub gaps: Vec<Gap>,
    /// Whether the range held more than [`MAX_RECORDS`] (the answer stops
    /// there).
    pub truncated: bool,
}

fn number(v: &[u8]) -> Option<f64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|t| t.trim().parse::<f64>().ok())
        .filter(|x| x.is_finite())
}

fn json(v: &[u8]) -> Value {
    serde_json::from_slice(v).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(v).into()))
}

/// Shapes `landed` (by time, as [`crdt_state::Store::landed`] returns
/// them, at most [`MAX_RECORDS`] + 1) into the answer.
pub fn shape(
    node: &str,
    series: &str,
    from: u64,
    to: u64,
    step: u64,
    mut landed: Vec<Landed>,
) -> Answer {
    let truncated = landed.len() > MAX_RECORDS;
    landed.truncate(MAX_RECORDS);
    let (kept, summarised): (Vec<Landed>, Vec<Landed>) =
        landed.into_iter().partition(|r| r.kind == 0);
    let summaries: Vec<Summary> = summarised
        .iter()
        .map(|r| Summary {
            t: r.at_ms,
            summary: json(&r.value),
        })
        .collect();
    // Each summary covers [first_ms, last_ms] of what it stands for.
    let covered: Vec<(u64, u64)> = summaries
        .iter()
        .map(|s| {
            let a = s.summary["first_ms"].as_u64().unwrap_or(s.t);
            let b = s.summary["last_ms"].as_u64().unwrap_or(s.t);
            (a, b)
        })
        .collect();
    let mut gaps = Vec::new();
    let times: Vec<u64> = kept.iter().map(|r| r.at_ms).collect();
    let mut deltas: Vec<u64> = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|d| *d > 0)
        .collect();
    if !deltas.is_empty() {
        deltas.sort_unstable();
        let rhythm = deltas[deltas.len() / 2];
        let longer = rhythm.saturating_mul(3).max(step.saturating_mul(2)).max(1);
        for w in times.windows(2) {
            if w[1] - w[0] > longer {
                let summarised = covered.iter().any(|(a, b)| *a <= w[1] && *b >= w[0]);
                gaps.push(Gap {
                    from: w[0],
                    to: w[1],
                    summarised,
                });
            }
        }
    }
    let records = kept.len() as u64;
    let points = if step == 0 {
        kept.iter()
            .map(|r| Point {
                t: r.at_ms,
                v: json(&r.value),
                count: None,
                min: None,
                max: None,
            })
            .collect()
    } else {
        let mut out: Vec<Point> = Vec::new();
        let mut sum = 0.0;
        let mut numbers = 0u64;
        for r in &kept {
            let t = r.at_ms - r.at_ms % step;
            if out.last().is_none_or(|p| p.t != t) {
                if let Some(p) = out.last_mut() {
                    p.v = if numbers > 0 {
                        (sum / numbers as f64).into()
                    } else {
                        Value::Null
                    };
                }
                out.push(Point {
                    t,
                    v: Value::Null,
                    count: Some(0),
                    min: None,
                    max: None,
                });
                (sum, numbers) = (0.0, 0);
            }
            let Some(p) = out.last_mut() else { continue };
            p.count = Some(p.count.unwrap_or(0) + 1);
            if let Some(x) = number(&r.value) {
                p.min = Some(p.min.map_or(x, |m: f64| m.min(x)));
                p.max = Some(p.max.map_or(x, |m: f64| m.max(x)));
                sum += x;
                numbers += 1;
            }
        }
        if let Some(p) = out.last_mut() {
            p.v = if numbers > 0 {
                (sum / numbers as f64).into()
            } else {
                Value::Null
            };
        }
        out
    };
    Answer {
        node: node.to_string(),
        series: series.to_string(),
        from,
        to,
        step,
        records,
        points,
        summaries,
        gaps,
        truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, at: u64, kind: u8, v: &str) -> Landed {
        Landed {
            series: "m/v".into(),
            seq,
            at_ms: at,
            kind,
            value: v.as_bytes().to_vec(),
        }
    }

    /// One reading a second with a stretch the node summarised and one it
    /// lost nothing of but sent nothing for: two gaps, one marked as
    /// summarised; steps average and bound their numbers.
    #[test]
    fn points_steps_summaries_and_gaps() {
        let mut landed: Vec<Landed> = (0..10)
            .map(|i| rec(i, i * 1000, 0, &format!("{i}.5")))
            .collect();
        // 10 s..70 s: summarised (the quota dropped it).
        landed.push(rec(
            100,
            0,
            1,
            r#"{"count":60,"min":1,"max":9,"mean":5,"first_ms":10000,"last_ms":69000}"#,
        ));
        landed.extend((0..5).map(|i| rec(200 + i, 70_000 + i * 1000, 0, "7")));
        // 75 s..200 s: nothing at all.
        landed.extend((0..3).map(|i| rec(300 + i, 200_000 + i * 1000, 0, "{\"state\":\"ok\"}")));
        landed.sort_by_key(|r| (r.at_ms, r.seq));
        let a = shape("n1", "m/v", 0, 300_000, 0, landed.clone());
        assert_eq!(a.records, 18);
        assert_eq!(a.points.len(), 18);
        assert_eq!(a.points[1].v, serde_json::json!(1.5));
        assert_eq!(a.points[17].v, serde_json::json!({"state": "ok"}));
        assert_eq!(a.summaries.len(), 1);
        assert_eq!(a.summaries[0].summary["count"], 60);
        assert_eq!(
            a.gaps,
            [
                Gap {
                    from: 9000,
                    to: 70_000,
                    summarised: true
                },
                Gap {
                    from: 74_000,
                    to: 200_000,
                    summarised: false
                },
            ]
        );
        assert!(!a.truncated);
        let b = shape("n1", "m/v", 0, 300_000, 5000, landed);
        assert_eq!(b.points[0].t, 0);
        assert_eq!(b.points[0].count, Some(5));
        assert_eq!(b.points[0].v, serde_json::json!(2.5));
        assert_eq!((b.points[0].min, b.points[0].max), (Some(0.5), Some(4.5)));
        let last = b.points.last().unwrap();
        assert_eq!(
            (last.count, last.v.clone()),
            (Some(3), Value::Null),
            "no numbers: no mean"
        );
    }
}
