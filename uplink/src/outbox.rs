//! The node's side of `/shoal/data/1`, sans-IO (ADR 0010 point 4): what to
//! read from the outbox next, live first, and what an answer settles.
//!
//! The driver asks [`Uplink::next_read`] what to read (sequence numbers
//! from, how many, live or backfill), reads that from its store's outbox
//! (which holds only what no anchor acknowledged), hands the entries it
//! got to [`Uplink::sent`], which says which of them to put in the batch
//! it sends, and reports answers ([`Uplink::acked`]) or the end of the
//! stream ([`Uplink::lost`]). Records made after the stream began go out
//! on the live cursor as soon as they exist; the backlog goes out on the
//! backfill cursor only while nothing live is waiting, with at most
//! [`BACKFILL_WINDOW`] backfill batches (and [`WINDOW`] in all)
//! unanswered.

use std::collections::BTreeMap;

/// Batches sent and not answered yet, at most...
pub const WINDOW: usize = 4;
/// ...of which backfill, at most: the rest is kept for live batches, and
/// a live batch is answered after at most this many backfill batches (an
/// anchor answers a stream's batches in order).
pub const BACKFILL_WINDOW: usize = 2;
/// Most records read for one live batch.
pub const LIVE_LIMIT: usize = 10_000;
/// Most records read for one backfill batch: big enough that a batch's
/// overhead (a signature, a frame, a round trip, a transaction at each
/// end) is small, small enough that a live batch behind
/// [`BACKFILL_WINDOW`] of them waits a fraction of a second (20,000
/// records land in about 0.1 s).
pub const BACKFILL_LIMIT: usize = 20_000;

/// What to read from the outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    /// From this sequence number on.
    pub from: u64,
    /// At most this many.
    pub limit: usize,
    /// Live (records made since the stream began) or backfill.
    pub live: bool,
}

/// The uplink of one stream to one anchor.
#[derive(Debug)]
pub struct Uplink {
    /// The next sequence number the live cursor reads from.
    live_from: u64,
    /// The next sequence number the backfill reads from.
    backfill_from: u64,
    /// The newest sequence number the store holds (told by the driver).
    newest: Option<u64>,
    /// Batches unanswered: number → the sequence numbers they carry.
    in_flight: BTreeMap<u64, Vec<u64>>,
    /// Which of them are backfill.
    backfilling: std::collections::BTreeSet<u64>,
    next_number: u64,
}

impl Uplink {
    /// A new stream; `newest` is the newest sequence number in the store
    /// now (`None`: empty). What is there already is backlog; what comes
    /// after is live.
    pub fn new(newest: Option<u64>, first_number: u64) -> Uplink {
        Uplink {
            live_from: newest.map_or(0, |n| n + 1),
            backfill_from: 0,
            newest,
            in_flight: BTreeMap::new(),
            backfilling: Default::default(),
            next_number: first_number,
        }
    }

    /// The store now holds records up to `newest`.
    pub fn stored(&mut self, newest: u64) {
        self.newest = Some(self.newest.map_or(newest, |n| n.max(newest)));
    }

    /// What to read next, if anything may be sent now.
    pub fn next_read(&self) -> Option<Read> {
        if self.in_flight.len() >= WINDOW {
            return None;
        }
        let newest = self.newest?;
        if newest >= self.live_from {
            return Some(Read {
                from: self.live_from,
                limit: LIVE_LIMIT,
                live: true,
            });
        }
        if self.backfilling.len() >= BACKFILL_WINDOW {
            return None;
        }
        (self.backfill_from < self.live_from).then_some(Read {
            from: self.backfill_from,
            limit: BACKFILL_LIMIT,
            live: false,
        })
    }

    /// The driver read `seqs` (ascending) for `read`: returns the batch
    /// number and the positions in `seqs` of the records to send (none:
    /// send nothing; the cursor moved on).
    pub fn sent(&mut self, read: Read, seqs: &[u64]) -> Option<(u64, Vec<usize>)> {
        let flying = |s: u64| self.in_flight.values().any(|v| v.binary_search(&s).is_ok());
        let live_from = self.live_from;
        let take: Vec<usize> = seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| (read.live || **s < live_from) && !flying(**s))
            .map(|(i, _)| i)
            .collect();
        let done = seqs.len() < read.limit;
        let last = seqs.last().copied();
        if read.live {
            match last {
                Some(l) => self.live_from = self.live_from.max(l + 1),
                None => self.live_from = self.newest.map_or(self.live_from, |n| n + 1),
            }
        } else {
            // The backfill moves past what it read, up to the live cursor
            // when the outbox had no more.
            self.backfill_from = match (last, done) {
                (Some(l), false) => (l + 1).min(self.live_from),
                _ => self.live_from,
            };
        }
        if take.is_empty() {
            return None;
        }
        let number = self.next_number;
        self.next_number += 1;
        let mut carried: Vec<u64> = take.iter().map(|i| seqs[*i]).collect();
        carried.sort_unstable();
        self.in_flight.insert(number, carried);
        if !read.live {
            self.backfilling.insert(number);
        }
        Some((number, take))
    }

    /// Batch `number` was acknowledged: returns the sequence numbers it
    /// carried (the driver marks those of them the answer names in its
    /// store), or `None` if no such batch is in flight.
    pub fn acked(&mut self, number: u64) -> Option<Vec<u64>> {
        self.backfilling.remove(&number);
        self.in_flight.remove(&number)
    }

    /// The stream ended or a batch was refused: nothing unanswered counts
    /// as sent; the backfill starts again from the oldest record no
    /// anchor acknowledged (the outbox holds nothing else).
    pub fn lost(&mut self) {
        self.in_flight.clear();
        self.backfilling.clear();
        self.backfill_from = 0;
    }

    /// Batches unanswered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The next batch number.
    pub fn next_number(&self) -> u64 {
        self.next_number
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// An outbox and an anchor in memory: every record reaches the anchor
    /// once acknowledged, live records overtake the backlog, and a lost
    /// stream costs resending only what was unanswered.
    struct World {
        outbox: BTreeSet<u64>,
        next: u64,
        anchor: BTreeSet<u64>,
        sent: Vec<(u64, Vec<u64>, bool)>,
        acked: BTreeSet<u64>,
    }

    impl World {
        fn make(&mut self, n: u64) {
            for _ in 0..n {
                self.outbox.insert(self.next);
                self.next += 1;
            }
        }

        fn read(&self, r: Read) -> Vec<u64> {
            self.outbox.range(r.from..).take(r.limit).copied().collect()
        }

        /// Sends what the uplink wants until it wants nothing.
        fn pump(&mut self, u: &mut Uplink) {
            u.stored(self.next.saturating_sub(1));
            while let Some(r) = u.next_read() {
                let seqs = self.read(r);
                if let Some((n, take)) = u.sent(r, &seqs) {
                    let carried: Vec<u64> = take.iter().map(|i| seqs[*i]).collect();
                    self.sent.push((n, carried, r.live));
                }
            }
        }

        /// The anchor commits and acknowledges the oldest unanswered batch.
        fn answer_one(&mut self, u: &mut Uplink) -> bool {
            let Some(pos) = self
                .sent
                .iter()
                .position(|(n, _, _)| u.in_flight.contains_key(n))
            else {
                return false;
            };
            let (n, carried, _) = self.sent[pos].clone();
            for s in &carried {
                self.anchor.insert(*s);
                self.outbox.remove(s);
            }
            assert_eq!(u.acked(n), Some(carried.clone()));
            assert_eq!(u.acked(n), None, "answered once");
            self.acked.insert(n);
            true
        }
    }

    #[test]
    fn everything_arrives_once_live_first() {
        let mut w = World {
            outbox: BTreeSet::new(),
            next: 0,
            anchor: BTreeSet::new(),
            sent: Vec::new(),
            acked: BTreeSet::new(),
        };
        // A backlog of 200,000 (a partition), then the link returns.
        w.make(200_000);
        let mut u = Uplink::new(Some(w.next - 1), 0);
        w.pump(&mut u);
        assert_eq!(
            u.in_flight(),
            BACKFILL_WINDOW,
            "backfill takes its part of the window"
        );
        assert!(w.sent.iter().all(|(_, _, live)| !live));
        // Records made now go at once, before the rest of the backlog,
        // without waiting for an answer.
        w.make(10);
        w.pump(&mut u);
        let (_, carried, live) = w.sent.last().unwrap().clone();
        assert!(live, "a live batch takes a free slot");
        assert_eq!(carried, (200_000..200_010).collect::<Vec<_>>());
        assert_eq!(u.in_flight(), BACKFILL_WINDOW + 1);
        // Live batches fill the window; then nothing more goes.
        for i in 0..WINDOW {
            w.make(1);
            w.pump(&mut u);
            assert!(u.in_flight() <= WINDOW, "round {i}");
        }
        assert_eq!(u.in_flight(), WINDOW);
        assert!(w.answer_one(&mut u));
        // The stream breaks with batches unanswered: they are sent again,
        // nothing acknowledged is.
        u.lost();
        let mut u = Uplink::new(Some(w.next - 1), u.next_number());
        let mut rounds = 0;
        loop {
            if rounds < 50 {
                w.make(3);
            }
            w.pump(&mut u);
            if !w.answer_one(&mut u) && u.next_read().is_none() {
                break;
            }
            rounds += 1;
            assert!(rounds < 1000, "never done");
        }
        assert!(w.outbox.is_empty(), "{} left", w.outbox.len());
        assert_eq!(
            w.anchor.len() as u64,
            w.next,
            "every record reached the anchor"
        );
        // Each record is in exactly one acknowledged batch: what was
        // unanswered when the stream was lost went again, nothing
        // acknowledged did.
        let mut times: BTreeMap<u64, u32> = BTreeMap::new();
        for (n, carried, _) in &w.sent {
            if w.acked.contains(n) {
                for s in carried {
                    *times.entry(*s).or_default() += 1;
                }
            }
        }
        assert_eq!(times.len() as u64, w.next);
        assert!(
            times.values().all(|t| *t == 1),
            "a record acknowledged twice"
        );
        // And the lost stream did cost a resend (the test exercised it).
        let sent_records: usize = w.sent.iter().map(|(_, c, _)| c.len()).sum();
        assert!(sent_records as u64 > w.next);
    }

    #[test]
    fn records_in_flight_are_not_read_again() {
        let mut u = Uplink::new(Some(9), 0);
        let r = u.next_read().unwrap();
        assert_eq!((r.from, r.live), (0, false));
        let seqs: Vec<u64> = (0..10).collect();
        let (n, take) = u.sent(r, &seqs).unwrap();
        assert_eq!(take.len(), 10);
        // The backfill has caught up with the live cursor: nothing to read.
        assert_eq!(u.next_read(), None);
        // The stream is lost before the answer: the backfill starts over.
        u.lost();
        let r = u.next_read().unwrap();
        assert_eq!(r.from, 0);
        let (m, take) = u.sent(r, &seqs).unwrap();
        assert_ne!(n, m);
        assert_eq!(take.len(), 10);
        // A read that overlaps what is in flight skips it.
        let mut u2 = Uplink::new(Some(9), 0);
        let r = u2.next_read().unwrap();
        u2.sent(Read { limit: 5, ..r }, &seqs[..5]).unwrap();
        u2.backfill_from = 0;
        let r = u2.next_read().unwrap();
        let (_, take) = u2.sent(r, &seqs).unwrap();
        assert_eq!(take, [5, 6, 7, 8, 9]);
    }
}
