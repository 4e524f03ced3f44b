//! `/shoal/data/1`: a node writes batches ([`crate::batch`]), one per
//! frame of the mesh's framing, on a stream it opens to an anchor; the
//! anchor answers each, in order, once it has committed it (or why not).
//!
//! ```text
//! answer   u8 tag, then
//!          0 ack:      varint batch number, varint count of ranges, then
//!                      (first, last) sequence numbers per range (varints,
//!                      ascending, disjoint): what is now stored
//!          1 refused:  varint batch number, varint length + UTF-8 reason
//! ```
//!
//! The acknowledgement names the sequence numbers it covers, so the node
//! marks exactly those, whatever it sent. A refusal ends the stream: the
//! node's key is not trusted, its signature does not match, or the anchor
//! cannot store now; the node tries again later (another anchor, or after
//! a while), and nothing it holds is lost.

use thiserror::Error;

use crate::codec::{Reader, put};

/// The protocol's name on the mesh.
pub const PROTOCOL: &str = "/shoal/data/1";
/// Largest answer (MAX_RANGES ranges of two 10-byte varints fit).
pub const MAX_ANSWER: usize = 96 * 1024;
/// Most ranges in one acknowledgement.
pub const MAX_RANGES: usize = 4096;
/// Longest reason of a refusal (bytes).
pub const MAX_REASON: usize = 1024;

/// An anchor's answer to one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Committed: these inclusive ranges of sequence numbers are stored.
    Ack {
        /// The batch's number.
        number: u64,
        /// Ascending, disjoint.
        ranges: Vec<(u64, u64)>,
    },
    /// Not stored, and why.
    Refused {
        /// The batch's number.
        number: u64,
        /// Why, in words.
        reason: String,
    },
}

/// What was wrong with an answer.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed data answer: {0}")]
pub struct WireError(pub String);

fn bad(s: impl Into<String>) -> WireError {
    WireError(s.into())
}

/// The inclusive ranges that `seqs` (any order, repeats allowed) cover.
pub fn ranges_of(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut v: Vec<u64> = seqs.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in v {
        match out.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(s) => *last = s,
            _ => out.push((s, s)),
        }
    }
    out
}

impl Answer {
    /// The bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Answer::Ack { number, ranges } => {
                out.push(0);
                put(&mut out, *number);
                put(&mut out, ranges.len() as u64);
                for (a, b) in ranges {
                    put(&mut out, *a);
                    put(&mut out, *b);
                }
            }
            Answer::Refused { number, reason } => {
                out.push(1);
                put(&mut out, *number);
                let r = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
                // Cut on a character boundary.
                let r = match std::str::from_utf8(r) {
                    Ok(s) => s.as_bytes(),
                    Err(e) => &r[..e.valid_up_to()],
                };
                put(&mut out, r.len() as u64);
                out.extend_from_slice(r);
            }
        }
        out
    }

    /// Parses an answer within the bounds.
    pub fn decode(bytes: &[u8]) -> Result<Answer, WireError> {
        if bytes.len() > MAX_ANSWER {
            return Err(bad(format!("{} bytes (at most {MAX_ANSWER})", bytes.len())));
        }
        let mut r = Reader(bytes);
        let answer = match r.u8().map_err(bad)? {
            0 => {
                let number = r.varint().map_err(bad)?;
                let n = r.varint().map_err(bad)?;
                if n > MAX_RANGES as u64 {
                    return Err(bad(format!("{n} ranges (at most {MAX_RANGES})")));
                }
                let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let (a, b) = (r.varint().map_err(bad)?, r.varint().map_err(bad)?);
                    if b < a || ranges.last().is_some_and(|(_, last)| a <= *last) {
                        return Err(bad(format!("range {a}..={b} out of order")));
                    }
                    ranges.push((a, b));
                }
                Answer::Ack { number, ranges }
            }
            1 => {
                let number = r.varint().map_err(bad)?;
                let n = r.varint().map_err(bad)?;
                if n > MAX_REASON as u64 {
                    return Err(bad(format!("a reason of {n} bytes")));
                }
                let reason = std::str::from_utf8(r.take(n as usize).map_err(bad)?)
                    .map_err(|_| bad("a reason that is not UTF-8"))?
                    .to_string();
                Answer::Refused { number, reason }
            }
            t => return Err(bad(format!("answer tag {t}"))),
        };
        if !r.0.is_empty() {
            return Err(bad(format!("{} bytes after the answer", r.0.len())));
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_cover_exactly_the_sequence_numbers() {
        assert_eq!(ranges_of([5, 1, 2, 3, 9, 10, 2]), [(1, 3), (5, 5), (9, 10)]);
        assert_eq!(
            ranges_of([u64::MAX, u64::MAX - 1]),
            [(u64::MAX - 1, u64::MAX)]
        );
        assert!(ranges_of([]).is_empty());
    }

    #[test]
    fn answers_round_trip_and_lies_are_refused() {
        for a in [
            Answer::Ack {
                number: 7,
                ranges: vec![(0, 99), (200, 200)],
            },
            Answer::Refused {
                number: 8,
                reason: "not a node of this fleet".into(),
            },
        ] {
            assert_eq!(Answer::decode(&a.encode()), Ok(a));
        }
        let overlapping = Answer::Ack {
            number: 1,
            ranges: vec![(0, 9), (5, 12)],
        };
        assert!(
            Answer::decode(&overlapping.encode())
                .unwrap_err()
                .0
                .contains("out of order")
        );
        assert!(Answer::decode(&[2]).is_err());
        assert!(Answer::decode(&[0, 1]).is_err());
        let long = Answer::Refused {
            number: 1,
            reason: "é".repeat(MAX_REASON),
        };
        let Answer::Refused { reason, .. } = Answer::decode(&long.encode()).unwrap() else {
            panic!("a refusal")
        };
        assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'é'));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(a) = Answer::decode(&data) {
                prop_assert_eq!(Answer::decode(&a.encode()), Ok(a));
            }
        }

        #[test]
        fn any_acknowledgement_round_trips(seqs in proptest::collection::vec(any::<u64>(), 0..50), number in any::<u64>()) {
            let a = Answer::Ack { number, ranges: ranges_of(seqs) };
            prop_assert_eq!(Answer::decode(&a.encode()), Ok(a));
        }
    }
}
