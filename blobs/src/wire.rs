//! The bytes on `/shoal/blob/1`: one request per stream, its answer in
//! bounded frames.
//!
//! A fetcher opens a stream, writes one request and reads the answer: what
//! a peer holds of a blob ([`Request::Have`]: one frame), a run of the
//! blob's group hashes ([`Request::Cvs`]: one frame of at most 1 MiB), or a
//! run of up to [`MAX_GROUPS`] groups ([`Request::Groups`]: one frame per
//! group, in order, each the answer to a one-group request,
//! [`Request::group`]). A holder that cannot go on sends a `refused` frame
//! and closes. A receiver checks and writes each group before it reads the
//! next: a transfer holds one group in memory, whatever the run or the
//! blob's size, the disk's pace slows the sender through QUIC's flow
//! control, and a receiver killed at any moment has read at most one group
//! it did not write.
//!
//! ```text
//! request:  tag u8 | hash [32] | size u64 | (from u64 | count u32)
//! frame:    tag u8 | body
//!   have:   runs u32 | (start u64 | len u64) * runs
//!   cvs:    count u32 | [32] * count
//!   groups: from u64 | count u32 | bytes (the groups, back to back)
//!   refused: len u16 | UTF-8
//! ```
//! Integers are big-endian. Decoding checks every length against what the
//! buffer holds and against the bounds before it allocates.

use crate::store::Hash;
#[cfg(test)]
use crate::tree::GROUP;
use crate::tree::{group_range, groups};

/// Most groups one request asks for (4 MiB), streamed one frame per group.
pub const MAX_GROUPS: u32 = 256;
/// Most group hashes in one answer (1 MiB).
pub const MAX_CVS: u32 = 32 * 1024;
/// Most runs of held groups in one `have` answer.
pub const MAX_RUNS: u32 = 4096;
/// Largest frame of an answer on the wire (a full `cvs` frame; a group's
/// frame is 16 KiB and 13 bytes).
pub const MAX_ANSWER: usize = (MAX_CVS as usize) * 32 + 64;
/// Largest request on the wire.
pub const MAX_REQUEST: usize = 1 + 32 + 8 + 8 + 4;
/// Largest blob (1 TiB): what a size may claim.
pub const MAX_SIZE: u64 = 1 << 40;

/// A malformed request or answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("blob protocol: {0}")]
pub struct WireError(pub String);

fn bad(why: impl Into<String>) -> WireError {
    WireError(why.into())
}

/// What a fetcher asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Which groups of the blob do you hold?
    Have {
        /// The blob.
        hash: Hash,
        /// Its size (from the signed document).
        size: u64,
    },
    /// Group hashes `from .. from + count`.
    Cvs {
        /// The blob.
        hash: Hash,
        /// Its size.
        size: u64,
        /// First.
        from: u64,
        /// How many (≤ [`MAX_CVS`]).
        count: u32,
    },
    /// Groups `from .. from + count`.
    Groups {
        /// The blob.
        hash: Hash,
        /// Its size.
        size: u64,
        /// First.
        from: u64,
        /// How many (≤ [`MAX_GROUPS`]).
        count: u32,
    },
}

/// What a holder answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Runs of held groups (start, length), ascending; empty: none.
    Have(Vec<(u64, u64)>),
    /// Group hashes, as asked.
    Cvs(Vec<[u8; 32]>),
    /// Groups `from ..`, back to back.
    Groups {
        /// First group.
        from: u64,
        /// How many.
        count: u32,
        /// Their bytes.
        data: Vec<u8>,
    },
    /// Not answered, and why (not held, too many requests…).
    Refused(String),
}

const HAVE: u8 = 1;
const CVS: u8 = 2;
const GROUPS: u8 = 3;
const REFUSED: u8 = 4;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(bad(format!(
                "{n} more bytes expected, {} left",
                self.0.len()
            )));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn hash(&mut self) -> Result<[u8; 32], WireError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(bad(format!("{} bytes after the end", self.0.len())))
        }
    }
}

/// Checks that `from .. from + count` lies in a blob of `size` and that
/// `count` is within `max`.
fn check_run(size: u64, from: u64, count: u32, max: u32) -> Result<(), WireError> {
    if size > MAX_SIZE {
        return Err(bad(format!("a blob of {size} bytes is past the limit")));
    }
    if count == 0 || count > max {
        return Err(bad(format!("{count} items asked; 1 to {max} allowed")));
    }
    let end = from
        .checked_add(u64::from(count))
        .ok_or_else(|| bad("range overflows"))?;
    if end > groups(size) {
        return Err(bad(format!(
            "groups {from}..{end} asked of a blob of {} groups",
            groups(size)
        )));
    }
    Ok(())
}

impl Request {
    /// The blob asked about.
    pub fn hash(&self) -> Hash {
        match self {
            Request::Have { hash, .. }
            | Request::Cvs { hash, .. }
            | Request::Groups { hash, .. } => *hash,
        }
    }

    /// The size of the blob it is about.
    pub fn size(&self) -> u64 {
        match self {
            Request::Have { size, .. }
            | Request::Cvs { size, .. }
            | Request::Groups { size, .. } => *size,
        }
    }

    /// The one-group request that frame `i` (from 0) of the streamed
    /// answer to this `groups` request answers; `None` past its run or for
    /// another kind of request.
    pub fn group(&self, i: u64) -> Option<Request> {
        match self {
            Request::Groups {
                hash,
                size,
                from,
                count,
            } if i < u64::from(*count) => Some(Request::Groups {
                hash: *hash,
                size: *size,
                from: from + i,
                count: 1,
            }),
            _ => None,
        }
    }

    /// The bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_REQUEST);
        match self {
            Request::Have { hash, size } => {
                out.push(HAVE);
                out.extend_from_slice(&hash.0);
                out.extend_from_slice(&size.to_be_bytes());
            }
            Request::Cvs {
                hash,
                size,
                from,
                count,
            }
            | Request::Groups {
                hash,
                size,
                from,
                count,
            } => {
                out.push(if matches!(self, Request::Cvs { .. }) {
                    CVS
                } else {
                    GROUPS
                });
                out.extend_from_slice(&hash.0);
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&from.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
            }
        }
        out
    }

    /// Parses and bounds-checks a request.
    pub fn decode(bytes: &[u8]) -> Result<Request, WireError> {
        if bytes.len() > MAX_REQUEST {
            return Err(bad(format!("a request of {} bytes", bytes.len())));
        }
        let mut r = Reader(bytes);
        let tag = r.u8()?;
        let hash = Hash(r.hash()?);
        let size = r.u64()?;
        if size > MAX_SIZE {
            return Err(bad(format!("a blob of {size} bytes is past the limit")));
        }
        let req = match tag {
            HAVE => Request::Have { hash, size },
            CVS | GROUPS => {
                let from = r.u64()?;
                let count = r.u32()?;
                if tag == CVS {
                    check_run(size, from, count, MAX_CVS)?;
                    Request::Cvs {
                        hash,
                        size,
                        from,
                        count,
                    }
                } else {
                    check_run(size, from, count, MAX_GROUPS)?;
                    Request::Groups {
                        hash,
                        size,
                        from,
                        count,
                    }
                }
            }
            other => return Err(bad(format!("unknown request {other}"))),
        };
        r.end()?;
        Ok(req)
    }
}

impl Answer {
    /// The bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Answer::Have(runs) => {
                let runs = &runs[..runs.len().min(MAX_RUNS as usize)];
                out.push(HAVE);
                out.extend_from_slice(&(runs.len() as u32).to_be_bytes());
                for (s, l) in runs {
                    out.extend_from_slice(&s.to_be_bytes());
                    out.extend_from_slice(&l.to_be_bytes());
                }
            }
            Answer::Cvs(values) => {
                out.push(CVS);
                out.extend_from_slice(&(values.len() as u32).to_be_bytes());
                for v in values {
                    out.extend_from_slice(v);
                }
            }
            Answer::Groups { from, count, data } => {
                out.reserve(data.len() + 13);
                out.push(GROUPS);
                out.extend_from_slice(&from.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
                out.extend_from_slice(data);
            }
            Answer::Refused(why) => {
                let b: Vec<u8> = why.bytes().take(1024).collect();
                let b = String::from_utf8_lossy(&b).into_owned();
                out.push(REFUSED);
                out.extend_from_slice(&(b.len() as u16).to_be_bytes());
                out.extend_from_slice(b.as_bytes());
            }
        }
        out
    }

    /// Parses an answer to `req`: it must be the kind of answer `req`
    /// asks for and hold exactly what it asked (the groups' bytes are
    /// checked against their hashes by the caller, not here).
    pub fn decode(req: &Request, bytes: &[u8]) -> Result<Answer, WireError> {
        if bytes.len() > MAX_ANSWER {
            return Err(bad(format!("an answer of {} bytes", bytes.len())));
        }
        let mut r = Reader(bytes);
        let tag = r.u8()?;
        let answer = match (tag, req) {
            (REFUSED, _) => {
                let n = r.u16()? as usize;
                let text = String::from_utf8_lossy(r.take(n)?).into_owned();
                Answer::Refused(text)
            }
            (HAVE, Request::Have { size, .. }) => {
                let n = r.u32()?;
                if n > MAX_RUNS {
                    return Err(bad(format!("{n} runs")));
                }
                let total = groups(*size);
                let mut runs = Vec::with_capacity(n as usize);
                let mut last_end = 0u64;
                for _ in 0..n {
                    let (s, l) = (r.u64()?, r.u64()?);
                    let end = s.checked_add(l).ok_or_else(|| bad("run overflows"))?;
                    if l == 0 || s < last_end || end > total {
                        return Err(bad(format!(
                            "run {s}+{l} out of order or past {total} groups"
                        )));
                    }
                    last_end = end;
                    runs.push((s, l));
                }
                Answer::Have(runs)
            }
            (CVS, Request::Cvs { count, .. }) => {
                let n = r.u32()?;
                if n != *count {
                    return Err(bad(format!("{n} group hashes for {count} asked")));
                }
                let mut values = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    values.push(r.hash()?);
                }
                Answer::Cvs(values)
            }
            (GROUPS, Request::Groups { from, count, .. }) => Answer::Groups {
                from: *from,
                count: *count,
                data: groups_body(&mut r, req)?.to_vec(),
            },
            (tag, req) => {
                return Err(bad(format!("answer {tag} to a {} request", kind(req))));
            }
        };
        r.end()?;
        Ok(answer)
    }
}

/// How the reason of a refusal begins when the holder serves as many
/// streams as it will: the asker leaves it alone for a while
/// ([`crate::fetch::BUSY_MS`]) instead of asking again at once.
pub const BUSY: &str = "busy";

/// The groups' bytes of `bytes`, without copying them, if it is a
/// `groups` answer to `req` (and well formed: exactly what [`Answer::decode`]
/// would accept); `None` if it is another kind of answer, which
/// [`Answer::decode`] then parses.
pub fn groups_in<'a>(req: &Request, bytes: &'a [u8]) -> Result<Option<&'a [u8]>, WireError> {
    if bytes.first() != Some(&GROUPS) || !matches!(req, Request::Groups { .. }) {
        return Ok(None);
    }
    if bytes.len() > MAX_ANSWER {
        return Err(bad(format!("an answer of {} bytes", bytes.len())));
    }
    let mut r = Reader(bytes);
    r.u8()?;
    let data = groups_body(&mut r, req)?;
    r.end()?;
    Ok(Some(data))
}

/// The rest of a `groups` answer to `req` after its tag: the run it says
/// it holds must be the run asked, then its bytes.
fn groups_body<'a>(r: &mut Reader<'a>, req: &Request) -> Result<&'a [u8], WireError> {
    let Request::Groups {
        size, from, count, ..
    } = req
    else {
        return Err(bad(format!("answer {GROUPS} to a {} request", kind(req))));
    };
    let (f, c) = (r.u64()?, r.u32()?);
    if *count == 0 || (f, c) != (*from, *count) {
        return Err(bad(format!("groups {f}+{c} for {from}+{count} asked")));
    }
    let start = group_range(*size, *from).start;
    let end = group_range(*size, from + u64::from(*count) - 1).end;
    r.take((end - start) as usize)
}

/// Bytes before a group's own in the frame that answers a one-group
/// request: `Answer::Groups { from: g, count: 1, data }.encode()` is this
/// followed by `data`, so a holder can read the group from disk straight
/// behind it.
pub fn group_header(g: u64) -> [u8; GROUP_HEADER] {
    let mut h = [0u8; GROUP_HEADER];
    h[0] = GROUPS;
    h[1..9].copy_from_slice(&g.to_be_bytes());
    h[9..13].copy_from_slice(&1u32.to_be_bytes());
    h
}

/// Length of [`group_header`].
pub const GROUP_HEADER: usize = 13;

fn kind(req: &Request) -> &'static str {
    match req {
        Request::Have { .. } => "have",
        Request::Cvs { .. } => "cvs",
        Request::Groups { .. } => "groups",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The fuzz target's properties without its coverage guidance.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(req) = Request::decode(&data) {
                prop_assert_eq!(req.encode(), data.clone());
            }
            let req = Request::Groups { hash: h(), size: 3 * GROUP, from: 1, count: 2 };
            if let Ok(a) = Answer::decode(&req, &data) {
                prop_assert_eq!(Answer::decode(&req, &a.encode()).ok(), Some(a));
            }
        }
    }

    /// What `groups_in` says of `frame` is what `decode` says.
    fn agree(req: &Request, frame: &[u8]) -> Result<(), TestCaseError> {
        match (groups_in(req, frame), Answer::decode(req, frame)) {
            (Ok(Some(d)), Ok(Answer::Groups { data, .. })) => prop_assert_eq!(d, &data[..]),
            (Ok(Some(_)), other) => {
                prop_assert!(false, "groups_in took what decode says is {other:?}")
            }
            (Err(_), Ok(a)) => prop_assert!(false, "groups_in refused what decode took: {a:?}"),
            (Ok(None), Ok(Answer::Groups { .. })) => prop_assert!(false, "groups_in missed groups"),
            _ => {}
        }
        Ok(())
    }

    proptest! {
        /// The borrowing parse of a group answer accepts exactly what the
        /// full decoder accepts, with the same bytes: valid answers, each
        /// with one byte changed, cut short, or grown.
        #[test]
        fn groups_in_agrees_with_decode(
            len in 1u64..300,
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in 0usize..4,
            garbage in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let req = Request::Groups { hash: h(), size: len, from: 0, count: 1 };
            let good = Answer::Groups { from: 0, count: 1, data: vec![byte; len as usize] }.encode();
            agree(&req, &good)?;
            prop_assert!(groups_in(&req, &good).ok().flatten().is_some());
            let mut changed = good.clone();
            let i = at.index(changed.len());
            changed[i] ^= byte | 1;
            agree(&req, &changed)?;
            agree(&req, &good[..good.len().saturating_sub(cut)])?;
            let mut grown = good.clone();
            grown.extend_from_slice(&garbage);
            agree(&req, &grown)?;
            agree(&req, &garbage)?;
            agree(&Request::Have { hash: h(), size: len }, &good)?;
        }
    }

    fn h() -> Hash {
        Hash::of(b"blob")
    }

    #[test]
    fn a_group_frame_is_its_header_and_its_bytes() {
        let data = vec![7u8; 100];
        let whole = Answer::Groups {
            from: 5,
            count: 1,
            data: data.clone(),
        }
        .encode();
        assert_eq!(&whole[..GROUP_HEADER], &group_header(5));
        assert_eq!(&whole[GROUP_HEADER..], &data[..]);
        let req = Request::Groups {
            hash: h(),
            size: 10 * GROUP,
            from: 3,
            count: 4,
        };
        assert_eq!(
            req.group(2),
            Some(Request::Groups {
                hash: h(),
                size: 10 * GROUP,
                from: 5,
                count: 1
            })
        );
        assert_eq!(req.group(4), None, "past the run");
        assert_eq!(Request::Have { hash: h(), size: 1 }.group(0), None);
    }

    #[test]
    fn requests_and_answers_round_trip() -> Result<(), WireError> {
        let size = 100 * GROUP + 5;
        let reqs = [
            Request::Have { hash: h(), size },
            Request::Cvs {
                hash: h(),
                size,
                from: 3,
                count: 98,
            },
            Request::Groups {
                hash: h(),
                size,
                from: 96,
                count: 5,
            },
        ];
        for req in &reqs {
            assert_eq!(&Request::decode(&req.encode())?, req);
        }
        let answers = [
            Answer::Have(vec![(0, 10), (12, 1), (50, 51)]),
            Answer::Cvs(vec![[7u8; 32]; 98]),
            Answer::Groups {
                from: 96,
                count: 5,
                data: vec![1u8; (4 * GROUP + 5) as usize],
            },
        ];
        for (req, a) in reqs.iter().zip(&answers) {
            assert_eq!(&Answer::decode(req, &a.encode())?, a);
            let refused = Answer::Refused("not held".into());
            assert_eq!(Answer::decode(req, &refused.encode())?, refused);
        }
        Ok(())
    }

    #[test]
    fn out_of_bounds_and_mismatched_input_is_refused() {
        let size = 10 * GROUP;
        let too_many = Request::Groups {
            hash: h(),
            size,
            from: 0,
            count: MAX_GROUPS + 1,
        };
        assert!(Request::decode(&too_many.encode()).is_err());
        let past_end = Request::Groups {
            hash: h(),
            size,
            from: 8,
            count: 3,
        };
        let e = Request::decode(&past_end.encode()).unwrap_err();
        assert!(e.0.contains("8..11"), "{e}");
        let overflow = Request::Cvs {
            hash: h(),
            size,
            from: u64::MAX,
            count: 2,
        };
        assert!(Request::decode(&overflow.encode()).is_err());
        let huge = Request::Have {
            hash: h(),
            size: MAX_SIZE + 1,
        };
        assert!(Request::decode(&huge.encode()).is_err());
        // Trailing bytes, truncation, unknown tags.
        let mut b = Request::Have { hash: h(), size }.encode();
        b.push(0);
        assert!(Request::decode(&b).is_err());
        assert!(Request::decode(&b[..10]).is_err());
        assert!(Request::decode(&[9; 41]).is_err());
        // An answer that is not what was asked.
        let req = Request::Groups {
            hash: h(),
            size,
            from: 2,
            count: 2,
        };
        let other = Answer::Groups {
            from: 3,
            count: 2,
            data: vec![0; 2 * GROUP as usize],
        };
        assert!(Answer::decode(&req, &other.encode()).is_err());
        let short = Answer::Groups {
            from: 2,
            count: 2,
            data: vec![0; GROUP as usize],
        };
        assert!(Answer::decode(&req, &short.encode()).is_err());
        let cvs = Answer::Cvs(vec![[0; 32]; 2]);
        assert!(Answer::decode(&req, &cvs.encode()).is_err());
        let have = Request::Have { hash: h(), size };
        let unordered = Answer::Have(vec![(5, 2), (1, 1)]);
        assert!(Answer::decode(&have, &unordered.encode()).is_err());
        let past = Answer::Have(vec![(9, 2)]);
        assert!(Answer::decode(&have, &past.encode()).is_err());
    }
}
