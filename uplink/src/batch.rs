//! The batch: what one node sends up in one frame, signed by it.
//!
//! ```text
//! "SHD1"                      magic (also what sets the signed bytes apart
//!                             from every other message Shoal signs)
//! node key                    32 bytes: who produced and signed it
//! number                      varint: the node's batch counter
//! series count                varint, 1..=MAX_SERIES
//! per series:
//!   name                      varint length (1..=MAX_NAME) + UTF-8
//!   kind                      u8: 0 reading, 1 summary of dropped readings
//!   n                         varint, 1..=MAX_RECORDS in all
//!   sequence numbers          first (varint), then the n-1 deltas (each
//!                             >= 1) as runs: run count, (delta, length)...
//!   times (ms)                first (varint), then the n-1 deltas (zigzag)
//!                             as runs, likewise
//!   values                    u8 tag, then
//!                             0 decimal: scale k (0..=9), the first value
//!                               times 10^k (zigzag), then each next one's
//!                               difference (zigzag varint, one per value)
//!                             1 JSON: per value, varint length + the text
//!                             2 float32: as 0, of each value's shortest
//!                               float32 text (a register's 230.1f32 is
//!                               230.10000610351562 as a JSON number)
//!                             3 float64: each value's bits XOR the last's,
//!                               a byte of (leading, trailing) zero bytes
//!                               then the bytes between
//! signature                   64 bytes: Ed25519 over everything before it
//! ```
//!
//! Regular series (one reading a second, sequence numbers in step) cost a
//! run or two for their sequence numbers and times, and about one byte per
//! value for a number that moves a little between readings (a meter's
//! 230.1, 230.2…: decimal values are kept as integers of their last
//! decimal, so they take no float noise; a float32 register's value is
//! kept as the shortest decimal that is the same float32). Other numbers
//! take their changed bytes; anything else (text, objects) goes as JSON
//! text.
//!
//! Decoding never trusts a count: every length is checked against the
//! bytes left and the fixed bounds before anything is allocated, and every
//! error says what was wrong.

use thiserror::Error;

use crate::codec::{self, put};

/// The first bytes of every batch.
pub const MAGIC: &[u8; 4] = b"SHD1";
/// Largest encoded batch, signature included.
pub const MAX_BATCH: usize = 1 << 20;
/// Most series in one batch.
pub const MAX_SERIES: usize = 4096;
/// Most records in one batch, over all its series.
pub const MAX_RECORDS: usize = 1 << 18;
/// Longest series name (bytes).
pub const MAX_NAME: usize = 256;
/// Longest value (bytes of JSON text).
pub const MAX_VALUE: usize = 64 * 1024;
/// Most decimals a decimal column keeps.
pub const MAX_SCALE: u32 = 9;
/// Bytes of the signature at the end.
pub const SIGNATURE: usize = 64;

/// What a series holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Readings or records as they were made.
    Reading,
    /// Summaries of readings the node had to drop to stay within its quota
    /// (one per series and interval: a JSON object with the count, min,
    /// max, mean, first and last time).
    Summary,
}

/// One record: its sequence number on the node, its time, its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The node's sequence number (increasing over all series).
    pub seq: u64,
    /// Unix time in milliseconds (the node's clock).
    pub at_ms: u64,
    /// The value as JSON text.
    pub value: Vec<u8>,
}

/// The records of one series in a batch, by increasing sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Series {
    /// `device/resource` for readings; the app's series name for records.
    pub name: String,
    /// What the records are.
    pub kind: Kind,
    /// At least one, sequence numbers strictly increasing.
    pub records: Vec<Record>,
}

/// A batch before signing or after verifying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The public key of the node that produced it.
    pub node: [u8; 32],
    /// The node's batch counter (for logs; records are named by `seq`).
    pub number: u64,
    /// At least one series.
    pub series: Vec<Series>,
}

/// A decoded batch whose signature is still to be checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unverified<'a> {
    /// What it says.
    pub batch: Batch,
    /// The bytes the signature covers.
    pub signed: &'a [u8],
    /// The signature.
    pub signature: [u8; SIGNATURE],
}

/// What was wrong with a batch.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BatchError {
    /// Bytes that are not a batch, or break its bounds.
    #[error("malformed data batch: {0}")]
    Malformed(String),
    /// A batch that cannot be encoded (it would break the bounds).
    #[error("data batch not encodable: {0}")]
    Invalid(String),
}

fn bad(s: impl Into<String>) -> BatchError {
    BatchError::Malformed(s.into())
}

fn invalid(s: impl Into<String>) -> BatchError {
    BatchError::Invalid(s.into())
}

impl Batch {
    /// The bytes to sign: the whole batch but its signature. Refuses a
    /// batch the decoder would refuse.
    pub fn unsigned(&self) -> Result<Vec<u8>, BatchError> {
        if self.series.is_empty() || self.series.len() > MAX_SERIES {
            return Err(invalid(format!("{} series", self.series.len())));
        }
        let total: usize = self.series.iter().map(|s| s.records.len()).sum();
        if total > MAX_RECORDS {
            return Err(invalid(format!("{total} records (at most {MAX_RECORDS})")));
        }
        let mut out = Vec::with_capacity(64 + total * 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.node);
        put(&mut out, self.number);
        put(&mut out, self.series.len() as u64);
        for s in &self.series {
            encode_series(&mut out, s)?;
        }
        if out.len() + SIGNATURE > MAX_BATCH {
            return Err(invalid(format!(
                "{} bytes (at most {MAX_BATCH})",
                out.len() + SIGNATURE
            )));
        }
        Ok(out)
    }

    /// The whole batch, signed by `sign` (which signs the bytes it is
    /// given with the key of [`Batch::node`]).
    pub fn encode(
        &self,
        sign: impl FnOnce(&[u8]) -> [u8; SIGNATURE],
    ) -> Result<Vec<u8>, BatchError> {
        let mut out = self.unsigned()?;
        let signature = sign(&out);
        out.extend_from_slice(&signature);
        Ok(out)
    }

    /// Records in the batch.
    pub fn records(&self) -> usize {
        self.series.iter().map(|s| s.records.len()).sum()
    }
}

/// Parses a batch; its signature is the caller's to check
/// ([`Unverified::signed`] with the key of [`Batch::node`]).
pub fn decode(bytes: &[u8]) -> Result<Unverified<'_>, BatchError> {
    if bytes.len() > MAX_BATCH {
        return Err(bad(format!("{} bytes (at most {MAX_BATCH})", bytes.len())));
    }
    if bytes.len() < MAGIC.len() + 32 + SIGNATURE {
        return Err(bad(format!("{} bytes: too short for a batch", bytes.len())));
    }
    let (signed, sig) = bytes.split_at(bytes.len() - SIGNATURE);
    let mut signature = [0u8; SIGNATURE];
    signature.copy_from_slice(sig);
    let mut r = Reader::new(signed);
    if r.take(4)? != MAGIC {
        return Err(bad("not a data batch (wrong magic)"));
    }
    let mut node = [0u8; 32];
    node.copy_from_slice(r.take(32)?);
    let number = r.varint("batch number")?;
    let count = r.varint("series count")?;
    if count == 0 || count > MAX_SERIES as u64 {
        return Err(bad(format!("{count} series (1 to {MAX_SERIES})")));
    }
    let mut budget = MAX_RECORDS;
    let mut series = Vec::with_capacity(count as usize);
    for i in 0..count {
        let s = decode_series(&mut r, &mut budget).map_err(|e| match e {
            BatchError::Malformed(m) => bad(format!("series {i}: {m}")),
            other => other,
        })?;
        series.push(s);
    }
    if r.rest() > 0 {
        return Err(bad(format!("{} bytes after the last series", r.rest())));
    }
    Ok(Unverified {
        batch: Batch {
            node,
            number,
            series,
        },
        signed,
        signature,
    })
}

fn encode_series(out: &mut Vec<u8>, s: &Series) -> Result<(), BatchError> {
    if s.name.is_empty() || s.name.len() > MAX_NAME {
        return Err(invalid(format!("a series name of {} bytes", s.name.len())));
    }
    let Some(first) = s.records.first() else {
        return Err(invalid(format!("series {} has no records", s.name)));
    };
    put(out, s.name.len() as u64);
    out.extend_from_slice(s.name.as_bytes());
    out.push(match s.kind {
        Kind::Reading => 0,
        Kind::Summary => 1,
    });
    put(out, s.records.len() as u64);
    // Sequence numbers: strictly increasing.
    let mut deltas = Vec::with_capacity(s.records.len());
    for w in s.records.windows(2) {
        if w[1].seq <= w[0].seq {
            return Err(invalid(format!(
                "series {}: sequence {} after {}",
                s.name, w[1].seq, w[0].seq
            )));
        }
        deltas.push(w[1].seq - w[0].seq);
    }
    put(out, first.seq);
    put_runs(out, &deltas);
    // Times: any order (a node's clock may step back).
    deltas.clear();
    for w in s.records.windows(2) {
        deltas.push(zigzag(w[1].at_ms.wrapping_sub(w[0].at_ms) as i64));
    }
    put(out, first.at_ms);
    put_runs(out, &deltas);
    // Values.
    for r in &s.records {
        if r.value.len() > MAX_VALUE {
            return Err(invalid(format!(
                "series {}: a value of {} bytes (at most {MAX_VALUE})",
                s.name,
                r.value.len()
            )));
        }
    }
    let texts: Vec<&[u8]> = s.records.iter().map(|r| r.value.as_slice()).collect();
    if let Some((k, mantissas)) = decimals(&texts) {
        out.push(0);
        put_decimals(out, k, &mantissas);
        return Ok(());
    }
    let floats: Option<Vec<f64>> = texts.iter().map(|t| number(t)).collect();
    let Some(floats) = floats else {
        out.push(1);
        for t in texts {
            put(out, t.len() as u64);
            out.extend_from_slice(t);
        }
        return Ok(());
    };
    // Values that are all float32s: their shortest float32 decimals.
    let short: Option<Vec<Vec<u8>>> = floats
        .iter()
        .map(|v| {
            let f = *v as f32;
            (f64::from(f) == *v).then(|| f.to_string().into_bytes())
        })
        .collect();
    if let Some(short) = short {
        let refs: Vec<&[u8]> = short.iter().map(Vec::as_slice).collect();
        if let Some((k, mantissas)) = decimals(&refs) {
            out.push(2);
            put_decimals(out, k, &mantissas);
            return Ok(());
        }
    }
    out.push(3);
    let mut prev = 0u64;
    for v in floats {
        let bits = v.to_bits();
        let x = bits ^ prev;
        prev = bits;
        if x == 0 {
            out.push(0x80);
            continue;
        }
        let lead = x.leading_zeros() / 8;
        let trail = x.trailing_zeros() / 8;
        out.push(((lead as u8) << 4) | trail as u8);
        out.extend_from_slice(&x.to_be_bytes()[lead as usize..(8 - trail) as usize]);
    }
    Ok(())
}

fn decode_series(r: &mut Reader<'_>, budget: &mut usize) -> Result<Series, BatchError> {
    let len = r.varint("name length")?;
    if len == 0 || len > MAX_NAME as u64 {
        return Err(bad(format!("a name of {len} bytes (1 to {MAX_NAME})")));
    }
    let name = std::str::from_utf8(r.take(len as usize)?)
        .map_err(|_| bad("a name that is not UTF-8"))?
        .to_string();
    let kind = match r.u8("kind")? {
        0 => Kind::Reading,
        1 => Kind::Summary,
        k => return Err(bad(format!("{name}: kind {k}"))),
    };
    let n = r.varint("record count")?;
    if n == 0 || n > *budget as u64 {
        return Err(bad(format!(
            "{name}: {n} records ({} left of {MAX_RECORDS} in a batch)",
            *budget
        )));
    }
    let n = n as usize;
    *budget -= n;
    // Each record costs at least one byte of value: a count beyond the
    // bytes left is a lie, refused before allocating for it.
    if n > r.rest() {
        return Err(bad(format!("{name}: {n} records in {} bytes", r.rest())));
    }
    let mut seqs = Vec::with_capacity(n);
    seqs.push(r.varint("first sequence number")?);
    for d in get_runs(r, n - 1, "sequence")? {
        if d == 0 {
            return Err(bad(format!("{name}: sequence numbers not increasing")));
        }
        let last = *seqs.last().unwrap_or(&0);
        let next = last
            .checked_add(d)
            .ok_or_else(|| bad(format!("{name}: sequence number overflows")))?;
        seqs.push(next);
    }
    let mut times = Vec::with_capacity(n);
    times.push(r.varint("first time")?);
    for d in get_runs(r, n - 1, "time")? {
        let last = *times.last().unwrap_or(&0);
        times.push(last.wrapping_add(unzigzag(d) as u64));
    }
    let values: Vec<Vec<u8>> = match r.u8("value tag")? {
        tag @ (0 | 2) => {
            let k = u32::from(r.u8("scale")?);
            if k > MAX_SCALE {
                return Err(bad(format!("{name}: scale {k} (at most {MAX_SCALE})")));
            }
            let mut out = Vec::with_capacity(n);
            let mut m = 0i64;
            for _ in 0..n {
                m = m.wrapping_add(unzigzag(r.varint("value")?));
                let text = decimal_text(m, k);
                if tag == 0 {
                    out.push(text.into_bytes());
                } else {
                    let f: f32 = text
                        .parse()
                        .map_err(|_| bad(format!("{name}: {text} is not a float32")))?;
                    if !f.is_finite() {
                        return Err(bad(format!("{name}: {text} overflows a float32")));
                    }
                    out.push(f64::from(f).to_string().into_bytes());
                }
            }
            out
        }
        3 => {
            let mut out = Vec::with_capacity(n);
            let mut prev = 0u64;
            for _ in 0..n {
                let head = r.u8("value")?;
                let x = if head == 0x80 {
                    0
                } else {
                    let (lead, trail) = (usize::from(head >> 4), usize::from(head & 0x0f));
                    if lead + trail >= 8 {
                        return Err(bad(format!("{name}: a float of {lead}+{trail} zero bytes")));
                    }
                    let mut b = [0u8; 8];
                    b[lead..8 - trail].copy_from_slice(r.take(8 - lead - trail)?);
                    u64::from_be_bytes(b)
                };
                prev ^= x;
                let v = f64::from_bits(prev);
                if !v.is_finite() {
                    return Err(bad(format!("{name}: a value that is not a finite number")));
                }
                out.push(v.to_string().into_bytes());
            }
            out
        }
        1 => {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let len = r.varint("value length")?;
                if len > MAX_VALUE as u64 {
                    return Err(bad(format!("{name}: a value of {len} bytes")));
                }
                out.push(r.take(len as usize)?.to_vec());
            }
            out
        }
        t => return Err(bad(format!("{name}: value tag {t}"))),
    };
    let records = seqs
        .into_iter()
        .zip(times)
        .zip(values)
        .map(|((seq, at_ms), value)| Record { seq, at_ms, value })
        .collect();
    Ok(Series {
        name,
        kind,
        records,
    })
}

/// A JSON number's value, if `text` is one (finite).
fn number(text: &[u8]) -> Option<f64> {
    let t = std::str::from_utf8(text).ok()?;
    // JSON numbers only: no `inf`, `NaN`, `+1`, `.5`.
    let first = t.as_bytes().first()?;
    if !(first.is_ascii_digit() || *first == b'-')
        || t.bytes()
            .any(|b| b.is_ascii_alphabetic() && b != b'e' && b != b'E')
    {
        return None;
    }
    t.parse::<f64>().ok().filter(|v| v.is_finite())
}

fn put_decimals(out: &mut Vec<u8>, k: u32, mantissas: &[i64]) {
    out.push(k as u8);
    let mut prev = 0i64;
    for m in mantissas {
        put(out, zigzag(m.wrapping_sub(prev)));
        prev = *m;
    }
}

/// The values as integers of their last decimal, if every one is a plain
/// decimal number (`-12.5`, `230`, no exponent) that fits.
fn decimals(texts: &[&[u8]]) -> Option<(u32, Vec<i64>)> {
    let parsed: Vec<(i64, u32)> = texts
        .iter()
        .map(|t| parse_decimal(t))
        .collect::<Option<_>>()?;
    let k = parsed.iter().map(|(_, f)| *f).max().unwrap_or(0);
    let mantissas = parsed
        .into_iter()
        .map(|(m, f)| m.checked_mul(10i64.checked_pow(k - f)?))
        .collect::<Option<Vec<i64>>>()?;
    // Deltas must not overflow either.
    for w in mantissas.windows(2) {
        w[1].checked_sub(w[0])?;
    }
    Some((k, mantissas))
}

/// `-?digits(.digits)?` as (the digits as one integer, how many follow the
/// point); `None` for anything else or beyond [`MAX_SCALE`] decimals or 18
/// digits.
fn parse_decimal(text: &[u8]) -> Option<(i64, u32)> {
    let (neg, rest) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let (int, frac) = match rest.iter().position(|b| *b == b'.') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if int.is_empty() || frac.is_some_and(|f| f.is_empty()) {
        return None;
    }
    let frac = frac.unwrap_or(&[]);
    if frac.len() > MAX_SCALE as usize || int.len() + frac.len() > 18 {
        return None;
    }
    let mut m: i64 = 0;
    for b in int.iter().chain(frac) {
        if !b.is_ascii_digit() {
            return None;
        }
        m = m * 10 + i64::from(b - b'0');
    }
    Some((if neg { -m } else { m }, frac.len() as u32))
}

/// `m / 10^k` as the shortest decimal text (`2301, 1` → `230.1`,
/// `2300, 1` → `230`, `-5, 2` → `-0.05`).
fn decimal_text(m: i64, k: u32) -> String {
    let digits = m.unsigned_abs().to_string();
    let sign = if m < 0 { "-" } else { "" };
    let k = k as usize;
    let (int, frac) = if digits.len() > k {
        digits.split_at(digits.len() - k)
    } else {
        ("0", digits.as_str())
    };
    let frac = format!("{frac:0>k$}");
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        if int == "0" {
            "0".to_string()
        } else {
            format!("{sign}{int}")
        }
    } else {
        format!("{sign}{int}.{frac}")
    }
}

/// `deltas` as runs: the run count, then (value, length) per run.
fn put_runs(out: &mut Vec<u8>, deltas: &[u64]) {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for d in deltas {
        match runs.last_mut() {
            Some((v, n)) if v == d => *n += 1,
            _ => runs.push((*d, 1)),
        }
    }
    put(out, runs.len() as u64);
    for (v, n) in runs {
        put(out, v);
        put(out, n);
    }
}

fn get_runs(r: &mut Reader<'_>, n: usize, what: &str) -> Result<Vec<u64>, BatchError> {
    let count = r.varint(what)?;
    if count > n as u64 {
        return Err(bad(format!("{count} runs of {what} deltas for {n}")));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..count {
        let v = r.varint(what)?;
        let len = r.varint(what)?;
        if len == 0 || len > (n - out.len()) as u64 {
            return Err(bad(format!(
                "a run of {len} {what} deltas where {} are left",
                n - out.len()
            )));
        }
        out.extend(std::iter::repeat_n(v, len as usize));
    }
    if out.len() != n {
        return Err(bad(format!("{} {what} deltas for {n}", out.len())));
    }
    Ok(out)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// The crate's reader, with errors that name what was being read.
struct Reader<'a>(codec::Reader<'a>);

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader(codec::Reader(bytes))
    }

    fn rest(&self) -> usize {
        self.0.0.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        self.0.take(n).map_err(bad)
    }

    fn u8(&mut self, what: &str) -> Result<u8, BatchError> {
        self.0
            .u8()
            .map_err(|_| bad(format!("the batch ends before its {what}")))
    }

    fn varint(&mut self, what: &str) -> Result<u64, BatchError> {
        self.0.varint().map_err(|e| bad(format!("{what}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fake_sign(body: &[u8]) -> [u8; SIGNATURE] {
        let mut s = [0u8; SIGNATURE];
        for (i, b) in body.iter().enumerate() {
            s[i % SIGNATURE] ^= *b;
        }
        s
    }

    /// A day-like regular series: `n` readings a second apart, sequence
    /// numbers `step` apart, values a meter's voltage.
    fn regular(name: &str, n: usize, step: u64, first_seq: u64) -> Series {
        let records = (0..n)
            .map(|i| {
                let v = 2300 + ((i * 7919) % 13) as i64 - 6;
                Record {
                    seq: first_seq + i as u64 * step,
                    at_ms: 1_764_000_000_000 + i as u64 * 1000,
                    value: decimal_text(v, 1).into_bytes(),
                }
            })
            .collect();
        Series {
            name: name.into(),
            kind: Kind::Reading,
            records,
        }
    }

    #[test]
    fn a_batch_round_trips_and_its_signature_covers_everything_before_it() {
        let b = Batch {
            node: [7; 32],
            number: 3,
            series: vec![
                regular("meter/voltage", 100, 2, 10),
                Series {
                    name: "inspector/defects".into(),
                    kind: Kind::Reading,
                    records: vec![
                        Record {
                            seq: 11,
                            at_ms: 5,
                            value: br#"{"kind":"crack","score":0.93}"#.to_vec(),
                        },
                        Record {
                            seq: 13,
                            at_ms: 4,
                            value: b"\"ok\"".to_vec(),
                        },
                    ],
                },
            ],
        };
        let bytes = b.encode(fake_sign).unwrap();
        let u = decode(&bytes).unwrap();
        assert_eq!(u.batch, b);
        assert_eq!(u.signed, &bytes[..bytes.len() - SIGNATURE]);
        assert_eq!(u.signature, fake_sign(u.signed));
    }

    #[test]
    fn decimals_are_integers_of_their_last_digit() {
        assert_eq!(parse_decimal(b"230.1"), Some((2301, 1)));
        assert_eq!(parse_decimal(b"-0.05"), Some((-5, 2)));
        assert_eq!(parse_decimal(b"42"), Some((42, 0)));
        for no in [
            &b"1e5"[..],
            b"1.",
            b".5",
            b"\"5\"",
            b"",
            b"-",
            b"1.2.3",
            b"12345678901234567890",
        ] {
            assert_eq!(parse_decimal(no), None, "{}", String::from_utf8_lossy(no));
        }
        assert_eq!(decimal_text(2301, 1), "230.1");
        assert_eq!(decimal_text(2300, 1), "230");
        assert_eq!(decimal_text(-5, 2), "-0.05");
        assert_eq!(decimal_text(0, 3), "0");
        assert_eq!(decimal_text(-120, 2), "-1.2");
        // Mixed scales share the largest.
        let texts: Vec<&[u8]> = vec![b"1.5", b"2", b"-0.25"];
        assert_eq!(decimals(&texts), Some((2, vec![150, 200, -25])));
    }

    /// The wire cost the issue names: regular 1 Hz float series (100 of
    /// them interleaved on one node, a day's worth in batches of the
    /// largest size) take under 4 bytes a reading, signature included.
    #[test]
    fn a_regular_series_costs_under_two_bytes_a_reading() {
        let series: Vec<Series> = (0..100)
            .map(|i| regular(&format!("dev{i}/v"), 2000, 100, i))
            .collect();
        let b = Batch {
            node: [1; 32],
            number: 1,
            series,
        };
        let bytes = b.encode(fake_sign).unwrap();
        let per = bytes.len() as f64 / b.records() as f64;
        assert!(per < 2.0, "{per:.2} bytes a reading");
        assert_eq!(decode(&bytes).unwrap().batch, b);
    }

    /// Float32 registers read into f64 (`230.10000610351562`) cost as
    /// little as decimals, and come back as the same numbers; arbitrary
    /// floats take their changed bytes.
    #[test]
    fn floats_take_few_bytes_and_come_back_the_same() {
        let series = |values: Vec<f64>| Series {
            name: "m/v".into(),
            kind: Kind::Reading,
            records: values
                .iter()
                .enumerate()
                .map(|(i, v)| Record {
                    seq: i as u64 + 1,
                    at_ms: 1000 * i as u64,
                    value: v.to_string().into_bytes(),
                })
                .collect(),
        };
        let f32s: Vec<f64> = (0..1000)
            .map(|i| f64::from(230.0f32 + (i % 7) as f32 / 10.0))
            .collect();
        let wide: Vec<f64> = (0..1000).map(|i| (i as f64).sqrt() * 1.000_000_1).collect();
        for (values, most) in [(f32s, 2.0), (wide, 9.0)] {
            let b = Batch {
                node: [3; 32],
                number: 1,
                series: vec![series(values.clone())],
            };
            let bytes = b.encode(fake_sign).unwrap();
            let per = bytes.len() as f64 / 1000.0;
            assert!(per < most, "{per:.2} bytes a value");
            let back = decode(&bytes).unwrap().batch;
            let got: Vec<f64> = back.series[0]
                .records
                .iter()
                .map(|r| std::str::from_utf8(&r.value).unwrap().parse().unwrap())
                .collect();
            assert_eq!(got, values);
        }
    }

    #[test]
    fn lies_are_refused_with_what_was_wrong() {
        let b = Batch {
            node: [2; 32],
            number: 9,
            series: vec![regular("m/v", 10, 1, 1)],
        };
        let good = b.encode(fake_sign).unwrap();
        let err = |bytes: &[u8]| decode(bytes).unwrap_err().to_string();
        assert!(err(&good[..20]).contains("too short"));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(err(&magic).contains("magic"));
        let mut extra = good[..good.len() - SIGNATURE].to_vec();
        extra.push(0);
        extra.extend_from_slice(&[0; SIGNATURE]);
        assert!(
            err(&extra).contains("after the last series"),
            "{}",
            err(&extra)
        );
        // A record count far beyond the bytes: refused before allocating.
        let mut huge = Vec::new();
        huge.extend_from_slice(MAGIC);
        huge.extend_from_slice(&[0; 32]);
        put(&mut huge, 1);
        put(&mut huge, 1);
        put(&mut huge, 1);
        huge.push(b'a');
        huge.push(0);
        put(&mut huge, (MAX_RECORDS - 1) as u64);
        huge.extend_from_slice(&[0; SIGNATURE]);
        assert!(err(&huge).contains("records in"), "{}", err(&huge));
        // Encoding refuses what decoding would.
        let mut backwards = b.clone();
        backwards.series[0].records.swap(0, 1);
        assert!(matches!(backwards.unsigned(), Err(BatchError::Invalid(_))));
        let empty = Batch {
            series: vec![],
            ..b
        };
        assert!(empty.unsigned().is_err());
    }

    fn arb_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (-1_000_000i64..1_000_000, 0u32..4).prop_map(|(m, k)| decimal_text(m, k).into_bytes()),
            any::<f32>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| f64::from(f).to_string().into_bytes()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| f.to_string().into_bytes()),
            Just(b"1e-7".to_vec()),
            "[ -~]{0,12}".prop_map(|s| serde_json_like(&s).into_bytes()),
        ]
    }

    /// A JSON string of `s` (printable ASCII, quotes and backslashes
    /// escaped): enough to exercise the JSON column.
    fn serde_json_like(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }

    fn arb_series() -> impl Strategy<Value = Series> {
        (
            "[a-z]{1,8}/[a-z]{1,8}",
            any::<bool>(),
            proptest::collection::vec((1u64..1000, any::<u32>(), arb_value()), 1..40),
            any::<u32>(),
        )
            .prop_map(|(name, summary, recs, first)| {
                let mut seq = u64::from(first);
                let records = recs
                    .into_iter()
                    .map(|(d, t, value)| {
                        seq += d;
                        Record {
                            seq,
                            at_ms: u64::from(t),
                            value,
                        }
                    })
                    .collect();
                Series {
                    name,
                    kind: if summary {
                        Kind::Summary
                    } else {
                        Kind::Reading
                    },
                    records,
                }
            })
    }

    /// Decimal columns come back as the same numbers (in their shortest
    /// text), everything else byte for byte.
    fn same_values(a: &Batch, b: &Batch) -> bool {
        let num = |v: &[u8]| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
        };
        a.node == b.node
            && a.number == b.number
            && a.series.len() == b.series.len()
            && a.series.iter().zip(&b.series).all(|(x, y)| {
                x.name == y.name
                    && x.kind == y.kind
                    && x.records.len() == y.records.len()
                    && x.records.iter().zip(&y.records).all(|(r, s)| {
                        r.seq == s.seq
                            && r.at_ms == s.at_ms
                            && (r.value == s.value
                                || (num(&r.value).is_some() && num(&r.value) == num(&s.value)))
                    })
            })
    }

    proptest! {
        #[test]
        fn any_batch_round_trips(
            series in proptest::collection::vec(arb_series(), 1..5),
            number in any::<u64>(),
        ) {
            let b = Batch { node: [5; 32], number, series };
            let bytes = b.encode(fake_sign).unwrap();
            let u = decode(&bytes).unwrap();
            prop_assert!(same_values(&b, &u.batch), "{b:?}\n{:?}", u.batch);
        }

        /// Any bytes: a batch or an error, never a panic; a decoded batch
        /// encodes back to the bytes it came from.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(u) = decode(&data) {
                let again = u.batch.unsigned();
                prop_assert!(again.is_ok());
            }
        }

        /// A valid batch with one byte changed: refused, or a batch whose
        /// signed bytes differ (so its signature no longer matches).
        #[test]
        fn one_changed_byte_never_goes_unnoticed(
            series in proptest::collection::vec(arb_series(), 1..3),
            at in any::<prop::sample::Index>(),
            x in 1u8..=255,
        ) {
            let b = Batch { node: [6; 32], number: 1, series };
            let mut bytes = b.encode(fake_sign).unwrap();
            let i = at.index(bytes.len());
            bytes[i] ^= x;
            if let Ok(u) = decode(&bytes) {
                prop_assert!(u.signature != fake_sign(u.signed) || u.batch != b);
            }
        }
    }
}
