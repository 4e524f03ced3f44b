//! Frames between sync engines (`/shoal/sync/1`).
//!
//! ```text
//! frame    = kind:u8 body
//! 1 digest = digest:[32] docs:varint                   what both should hold, summarised
//! 2 heads  = n:varint { id:str heads:varint [32]* }*   per document, when digests differ
//! 3 sync   = id:str msg:bytes sigs:varint [64]*         automerge sync message + signatures
//! str, bytes = len:varint data
//! ```
//!
//! The signatures of a sync frame are listed in ascending order of the
//! hashes of the changes the message carries (whether as change chunks or
//! as a whole document): no hash is repeated, no index is sent. Decoding is
//! bounded by the frame, which the transport bounds by
//! [`crate::signed::sync::SyncConfig::max_frame`].

use automerge::ChangeHash;

use crate::signed::doc::DocId;

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A summary of the (document, heads) pairs both sides should hold.
    Digest {
        /// SHA-256 over the sorted pairs.
        digest: [u8; 32],
        /// How many documents it covers.
        docs: u64,
    },
    /// Heads per document.
    Heads(Vec<(DocId, Vec<ChangeHash>)>),
    /// An automerge sync message for one document.
    Sync {
        /// The document.
        doc: DocId,
        /// The encoded automerge sync message.
        msg: Vec<u8>,
        /// Signatures of the carried changes, by ascending change hash.
        sigs: Vec<[u8; 64]>,
    },
}

/// Why a frame could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed frame: {0}")]
pub struct FrameError(pub String);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

impl Frame {
    /// Encodes the frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Frame::Digest { digest, docs } => {
                out.push(1);
                out.extend_from_slice(digest);
                put_varint(&mut out, *docs);
            }
            Frame::Heads(entries) => {
                out.push(2);
                put_varint(&mut out, entries.len() as u64);
                for (id, heads) in entries {
                    put_bytes(&mut out, id.to_string().as_bytes());
                    put_varint(&mut out, heads.len() as u64);
                    for h in heads {
                        out.extend_from_slice(&h.0);
                    }
                }
            }
            Frame::Sync { doc, msg, sigs } => {
                out.reserve(msg.len() + sigs.len() * 64 + 24);
                out.push(3);
                put_bytes(&mut out, doc.to_string().as_bytes());
                put_bytes(&mut out, msg);
                put_varint(&mut out, sigs.len() as u64);
                for s in sigs {
                    out.extend_from_slice(s);
                }
            }
        }
        out
    }

    /// Decodes a frame; anything malformed is an error naming what.
    pub fn decode(buf: &[u8]) -> Result<Frame, FrameError> {
        let mut r = Reader { buf, pos: 0 };
        let frame = match r.byte("kind")? {
            1 => {
                let digest: [u8; 32] = r
                    .take(32, "digest")?
                    .try_into()
                    .map_err(|_| FrameError("digest".into()))?;
                Frame::Digest {
                    digest,
                    docs: r.varint("document count")?,
                }
            }
            2 => {
                let n = r.count(2, "document count")?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = r.doc_id()?;
                    let k = r.count(32, "head count")?;
                    let mut heads = Vec::with_capacity(k);
                    for _ in 0..k {
                        let h: [u8; 32] = r
                            .take(32, "head")?
                            .try_into()
                            .map_err(|_| FrameError("head".into()))?;
                        heads.push(ChangeHash(h));
                    }
                    entries.push((id, heads));
                }
                Frame::Heads(entries)
            }
            3 => {
                let doc = r.doc_id()?;
                let len = r.count(1, "message length")?;
                let msg = r.take(len, "message")?.to_vec();
                let n = r.count(64, "signature count")?;
                let mut sigs = Vec::with_capacity(n);
                for _ in 0..n {
                    let s: [u8; 64] = r
                        .take(64, "signature")?
                        .try_into()
                        .map_err(|_| FrameError("signature".into()))?;
                    sigs.push(s);
                }
                Frame::Sync { doc, msg, sigs }
            }
            k => return Err(FrameError(format!("unknown frame kind {k}"))),
        };
        if r.pos != buf.len() {
            return Err(FrameError(format!("{} trailing bytes", buf.len() - r.pos)));
        }
        Ok(frame)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FrameError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| FrameError(format!("truncated {what} at byte {}", self.pos)))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self, what: &str) -> Result<u8, FrameError> {
        Ok(self.take(1, what)?[0])
    }

    fn varint(&mut self, what: &str) -> Result<u64, FrameError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte(what)?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FrameError(format!("{what}: varint too long")))
    }

    /// A count of items of at least `min` bytes each, checked against what remains.
    fn count(&mut self, min: usize, what: &str) -> Result<usize, FrameError> {
        let n = self.varint(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min as u64) > left {
            return Err(FrameError(format!(
                "{what} {n} exceeds the {left} bytes left"
            )));
        }
        Ok(n as usize)
    }

    fn doc_id(&mut self) -> Result<DocId, FrameError> {
        let len = self.count(1, "document id length")?;
        if len > 256 {
            return Err(FrameError(format!("document id of {len} bytes")));
        }
        let s = std::str::from_utf8(self.take(len, "document id")?)
            .map_err(|_| FrameError("document id is not UTF-8".into()))?;
        DocId::parse(s).map_err(|e| FrameError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_roundtrip() -> Result<(), FrameError> {
        let frames = [
            Frame::Digest {
                digest: [3; 32],
                docs: 300,
            },
            Frame::Heads(vec![
                (DocId::Fleet, vec![ChangeHash([1; 32])]),
                (
                    DocId::Node {
                        name: "n1".into(),
                        epoch: 2,
                    },
                    vec![],
                ),
            ]),
            Frame::Sync {
                doc: DocId::Site("a".into()),
                msg: vec![0x42, 1, 2],
                sigs: vec![[9; 64]],
            },
        ];
        for f in frames {
            let bytes = f.encode();
            assert_eq!(Frame::decode(&bytes)?, f);
            for cut in 0..bytes.len() {
                assert!(Frame::decode(&bytes[..cut]).is_err());
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Frame::decode(&bytes);
        }
    }
}
