//! Offline bundles: every signed change of every document in one file, for
//! sites with no network at all.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! "SHOALBDL" version:u8=1 root:[32]
//! certs:u32  { len:u32 json:[len] }*
//! docs:u32   { id_len:u16 id:[id_len] changes:u32 { len:u32 change:[len] sig:[64] }* }*
//! ```
//!
//! Decoding is bounded: every count is checked against the bytes that
//! remain before anything is allocated, so a garbage or hostile file costs
//! at most its own size.

use crate::error::{Error, Result};
use crate::signed::doc::{DocId, SignedChange};
use crate::signed::identity::{Certificate, PublicKey};

const MAGIC: &[u8; 8] = b"SHOALBDL";
const VERSION: u8 = 1;

/// Largest single change accepted in a bundle.
pub const MAX_CHANGE_BYTES: usize = 16 << 20;

/// A decoded bundle (not yet verified).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bundle {
    /// The fleet root the bundle belongs to.
    pub root: Option<PublicKey>,
    /// Certificates the exporter knew.
    pub certs: Vec<Certificate>,
    /// Signed changes per document, in causal order.
    pub docs: Vec<(DocId, Vec<SignedChange>)>,
}

impl Bundle {
    /// Encodes the bundle.
    pub fn encode(&self, root: PublicKey) -> Vec<u8> {
        let size: usize = self
            .docs
            .iter()
            .flat_map(|(_, cs)| cs.iter().map(|c| c.bytes.len() + 68))
            .sum();
        let mut out = Vec::with_capacity(64 + size);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&root.0);
        out.extend_from_slice(&(self.certs.len() as u32).to_be_bytes());
        for c in &self.certs {
            let j = c.to_json();
            out.extend_from_slice(&(j.len() as u32).to_be_bytes());
            out.extend_from_slice(j.as_bytes());
        }
        out.extend_from_slice(&(self.docs.len() as u32).to_be_bytes());
        for (id, changes) in &self.docs {
            let id = id.to_string();
            out.extend_from_slice(&(id.len() as u16).to_be_bytes());
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&(changes.len() as u32).to_be_bytes());
            for c in changes {
                out.extend_from_slice(&(c.bytes.len() as u32).to_be_bytes());
                out.extend_from_slice(&c.bytes);
                out.extend_from_slice(&c.signature);
            }
        }
        out
    }

    /// Decodes a bundle; any malformation is an error naming where.
    pub fn decode(bytes: &[u8]) -> Result<Bundle> {
        let mut r = Reader { buf: bytes, pos: 0 };
        if r.take(8, "magic")? != MAGIC {
            return Err(Error::Bundle("not a Shoal bundle (bad magic)".into()));
        }
        let version = r.take(1, "version")?[0];
        if version != VERSION {
            return Err(Error::Bundle(format!(
                "bundle version {version} is not supported (expected {VERSION})"
            )));
        }
        let root = PublicKey::from_slice(r.take(32, "fleet root")?)?;
        let ncerts = r.count(4, "certificate count")?;
        let mut certs = Vec::with_capacity(ncerts);
        for i in 0..ncerts {
            let len = r.u32("certificate length")? as usize;
            let json = r.take(len, "certificate")?;
            certs.push(
                Certificate::from_json(json)
                    .map_err(|e| Error::Bundle(format!("certificate #{i}: {e}")))?,
            );
        }
        let ndocs = r.count(2 + 4, "document count")?;
        let mut docs = Vec::with_capacity(ndocs);
        let mut seen = std::collections::HashSet::with_capacity(ndocs);
        for _ in 0..ndocs {
            let id_len = u16::from_be_bytes([r.byte("id")?, r.byte("id")?]) as usize;
            let id = std::str::from_utf8(r.take(id_len, "document id")?)
                .map_err(|_| Error::Bundle("document id is not UTF-8".into()))?;
            let id = DocId::parse(id).map_err(|e| Error::Bundle(e.to_string()))?;
            if !seen.insert(id.clone()) {
                return Err(Error::Bundle(format!("document {id} appears twice")));
            }
            let n = r.count(4 + 64, "change count")?;
            let mut changes = Vec::with_capacity(n);
            for i in 0..n {
                let len = r.u32("change length")? as usize;
                if len > MAX_CHANGE_BYTES {
                    return Err(Error::Bundle(format!(
                        "change #{i} of {id} is {len} bytes, more than {MAX_CHANGE_BYTES}"
                    )));
                }
                let bytes = r.take(len, "change")?.to_vec();
                let signature: [u8; 64] = r
                    .take(64, "signature")?
                    .try_into()
                    .map_err(|_| Error::Bundle("signature".into()))?;
                changes.push(SignedChange { bytes, signature });
            }
            docs.push((id, changes));
        }
        if r.pos != bytes.len() {
            return Err(Error::Bundle(format!(
                "{} trailing bytes after the last document",
                bytes.len() - r.pos
            )));
        }
        Ok(Bundle {
            root: Some(root),
            certs,
            docs,
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let Some(end) = end else {
            return Err(Error::Bundle(format!(
                "truncated: {what} at byte {} needs {n} bytes, {} left",
                self.pos,
                self.buf.len() - self.pos
            )));
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count of items each at least `min_item` bytes long; refuses counts
    /// the remaining bytes cannot hold.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize> {
        let n = self.u32(what)? as usize;
        let left = self.buf.len() - self.pos;
        if n.saturating_mul(min_item) > left {
            return Err(Error::Bundle(format!(
                "{what} {n} cannot fit in the {left} bytes that remain"
            )));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Bundle {
        Bundle {
            root: None,
            certs: vec![],
            docs: vec![
                (
                    DocId::Fleet,
                    vec![SignedChange {
                        bytes: vec![1, 2, 3],
                        signature: [7; 64],
                    }],
                ),
                (DocId::Site("a".into()), vec![]),
            ],
        }
    }

    #[test]
    fn roundtrip() -> anyhow::Result<()> {
        let root = PublicKey([9; 32]);
        let b = sample();
        let decoded = Bundle::decode(&b.encode(root))?;
        assert_eq!(decoded.root, Some(root));
        assert_eq!(decoded.docs, b.docs);
        Ok(())
    }

    #[test]
    fn truncation_is_an_error() {
        let bytes = sample().encode(PublicKey([9; 32]));
        for cut in 0..bytes.len() {
            assert!(Bundle::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn many_documents_decode_in_linear_time_and_a_duplicate_is_named() -> anyhow::Result<()> {
        // 200,000 documents: a scan per document for duplicates (what the
        // decoder did) makes 2·10¹⁰ comparisons, minutes even in release;
        // a set makes this a fraction of a second. The 60 s bound is far
        // from both, so a slow machine does not fail it.
        let docs: Vec<(DocId, Vec<SignedChange>)> = (0..200_000)
            .map(|i| (DocId::Site(format!("s{i}")), vec![]))
            .collect();
        let mut b = Bundle {
            root: None,
            certs: vec![],
            docs,
        };
        let t = std::time::Instant::now();
        let decoded = Bundle::decode(&b.encode(PublicKey([9; 32])))?;
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(decoded.docs.len(), 200_000);
        b.docs.push((DocId::Site("s7".into()), vec![]));
        let e = Bundle::decode(&b.encode(PublicKey([9; 32]))).unwrap_err();
        assert!(
            e.to_string().contains("document site/s7 appears twice"),
            "{e}"
        );
        Ok(())
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Bundle::decode(&bytes);
            let mut framed = MAGIC.to_vec();
            framed.push(VERSION);
            framed.extend_from_slice(&bytes);
            let _ = Bundle::decode(&framed);
        }
    }
}
