//! Data that came up: what an anchor checks before it stores a batch of
//! readings and records (ADR 0010 point 3), sans-IO.
//!
//! A batch is taken only if its key is a node certificate of the fleet,
//! not revoked, and its signature holds. The node it is stored under is the
//! certificate's name, never anything the batch says, so a node cannot
//! write another node's series; a neighbour or relay that carried the
//! batch cannot change a byte of it unnoticed.

use crdt_state::local::landing::Landed;
use crdt_state::{PublicKey, Role, Trust};
use uplink::batch::{self, Kind};

/// The latest time a record may carry: 9999-12-31T23:59:59.999Z.
pub const LATEST_MS: u64 = 253_402_300_799_999;

/// A batch an anchor may store.
#[derive(Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The node that produced it (its certificate's name).
    pub node: String,
    /// The node's batch number.
    pub number: u64,
    /// Its records, to land.
    pub records: Vec<Landed>,
    /// The sequence numbers they cover, for the acknowledgement.
    pub ranges: Vec<(u64, u64)>,
}

/// Why a batch is refused: its number (when it could be read) and the
/// reason, for the answer and the security log.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The batch's number, if the batch could be parsed.
    pub number: Option<u64>,
    /// Why.
    pub reason: String,
}

/// Checks `bytes` against the fleet's `trust`.
pub fn accept(trust: &Trust, bytes: &[u8]) -> Result<Accepted, Refusal> {
    let u = batch::decode(bytes).map_err(|e| Refusal {
        number: None,
        reason: e.to_string(),
    })?;
    let number = u.batch.number;
    let refuse = |reason: String| Refusal {
        number: Some(number),
        reason,
    };
    let key = PublicKey(u.batch.node);
    let cert = trust.cert(&key).ok_or_else(|| {
        refuse(format!(
            "key {} is not a certificate of this fleet",
            key.short()
        ))
    })?;
    if cert.role != Role::Node {
        return Err(refuse(format!("{} is not a node", cert.name)));
    }
    if trust.is_revoked(&key) {
        return Err(refuse(format!("{} is revoked", cert.name)));
    }
    key.verify_signature(u.signed, &u.signature)
        .map_err(|_| refuse(format!("the batch's signature is not {}'s", cert.name)))?;
    let records: Vec<Landed> = u
        .batch
        .series
        .into_iter()
        .flat_map(|s| {
            let kind = match s.kind {
                Kind::Reading => 0,
                Kind::Summary => 1,
            };
            let name = s.name;
            s.records.into_iter().map(move |r| Landed {
                series: name.clone(),
                seq: r.seq,
                at_ms: r.at_ms,
                kind,
                value: r.value,
            })
        })
        .collect();
    // A time past year 9999 is no reading's: refused, not stored (nor
    // copied to a database whose timestamps end there).
    if let Some(r) = records.iter().find(|r| r.at_ms > LATEST_MS) {
        return Err(refuse(format!(
            "record {} of {} is dated {} ms, after the year 9999",
            r.seq, r.series, r.at_ms
        )));
    }
    let ranges = uplink::wire::ranges_of(records.iter().map(|r| r.seq));
    Ok(Accepted {
        node: cert.name.clone(),
        number,
        records,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdt_state::DataDir;
    use uplink::batch::{Batch, Record, Series};

    fn batch_of(key: PublicKey, series: &str) -> Batch {
        Batch {
            node: key.0,
            number: 4,
            series: vec![Series {
                name: series.into(),
                kind: Kind::Reading,
                records: (0..5)
                    .map(|i| Record {
                        seq: 10 + i,
                        at_ms: 1000 * i,
                        value: format!("{}.5", i).into_bytes(),
                    })
                    .collect(),
            }],
        }
    }

    /// A node's own batch is taken, under the name its certificate gives;
    /// a changed byte, another key's signature, a stranger, an operator and
    /// a revoked node are refused, each saying why.
    #[test]
    fn only_a_trusted_nodes_own_signature_lands() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dd = DataDir::init(tmp.path(), "f", 1).unwrap();
        let n1 = dd.create_identity(Role::Node, Some("s1"), "n1", 2).unwrap();
        let n2 = dd.create_identity(Role::Node, Some("s1"), "n2", 2).unwrap();
        let op = dd
            .create_identity(Role::Operator, None, "alice", 2)
            .unwrap();
        let good = batch_of(n1.key(), "meter/v")
            .encode(|m| n1.sign(m))
            .unwrap();
        let a = accept(dd.trust(), &good).unwrap();
        assert_eq!((a.node.as_str(), a.number), ("n1", 4));
        assert_eq!(a.ranges, [(10, 14)]);
        assert_eq!(a.records.len(), 5);
        assert_eq!(a.records[1].value, b"1.5");

        let why_in = |dd: &DataDir, bytes: &[u8]| accept(dd.trust(), bytes).unwrap_err().reason;
        let why = |bytes: &[u8]| why_in(&dd, bytes);
        let mut changed = good.clone();
        let at = changed.len() - 70;
        changed[at] ^= 1;
        assert!(
            why(&changed).contains("signature") || why(&changed).contains("malformed"),
            "{}",
            why(&changed)
        );
        // n2 signs a batch that says it is n1's.
        let forged = batch_of(n1.key(), "meter/v")
            .encode(|m| n2.sign(m))
            .unwrap();
        assert!(
            why(&forged).contains("signature is not n1's"),
            "{}",
            why(&forged)
        );
        let stranger = crdt_state::signed::identity::generate_key().unwrap();
        let key = PublicKey(stranger.verifying_key().to_bytes());
        let unknown = batch_of(key, "m/v").encode(|_| [0; 64]).unwrap();
        assert!(why(&unknown).contains("not a certificate of this fleet"));
        let from_op = batch_of(op.key(), "m/v").encode(|m| op.sign(m)).unwrap();
        assert!(why(&from_op).contains("alice is not a node"));
        assert_eq!(accept(dd.trust(), &from_op).unwrap_err().number, Some(4));
        dd.revoke(n1.key(), "stolen", 3).unwrap();
        assert!(why_in(&dd, &good).contains("n1 is revoked"));
        assert_eq!(accept(dd.trust(), b"junk").unwrap_err().number, None);
        let mut late = batch_of(n2.key(), "m/v");
        late.series[0].records[4].at_ms = LATEST_MS + 1;
        let late = late.encode(|m| n2.sign(m)).unwrap();
        let r = why_in(&dd, &late);
        assert!(r.contains("after the year 9999"), "{r}");
    }
}
