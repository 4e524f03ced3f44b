//! `/shoal/data/1` in a running daemon (ADR 0010): a node sends what its
//! store's outbox holds up to one anchor at a time; an anchor checks,
//! lands and acknowledges what its nodes send.
//!
//! **Node.** One stream to one admitted anchor, run by a task of its own:
//! it asks [`uplink::outbox::Uplink`] what to read, reads that from the
//! outbox and signs the batch on blocking threads, writes it, and marks
//! what each acknowledgement covers in the store. It wakes when the node
//! stores readings or records ([`DataUp::waker`]). A stream that breaks or
//! is refused ends the task; the loop starts another (the next anchor
//! admitted, after a pause that grows with each failure). Nothing is lost
//! in between: the outbox holds everything unacknowledged.
//!
//! **Anchor.** Each stream of an admitted node is read by a task of its
//! own; each batch is checked ([`crate::data::accept`]) and landed in one
//! transaction on a blocking thread, then acknowledged. A batch that does
//! not check is refused, ends the stream and becomes a security event
//! naming the peer. With an exporter ([`DataUp::land`]'s `export`), the
//! batch is queued for it in the same transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crdt_state::local::readings::Outgoing;
use crdt_state::{Identity, Store, Trust};
use futures::AsyncReadExt;
use mesh::{Mesh, PeerId};
use tokio::sync::{Notify, mpsc, watch};
use uplink::batch::{Batch, Kind, MAX_BATCH, MAX_SERIES, Record, Series};
use uplink::outbox::{Read, Uplink};
use uplink::wire::{Answer, MAX_ANSWER};

/// How long a frame may take to leave, or an answer to come, before the
/// stream is given up.
const WAIT: Duration = Duration::from_secs(60);
/// Bytes of values (and names) read into one batch, at most: well within
/// [`MAX_BATCH`] whatever the records hold.
const BATCH_BYTES: usize = 768 * 1024;
/// Runs of consecutive sequence numbers in one batch, at most: its
/// acknowledgement then fits [`uplink::wire::MAX_RANGES`] and
/// [`MAX_ANSWER`] (a fragmented outbox, summaries between readings, would
/// otherwise make an answer the node cannot read).
const MAX_RUNS: usize = 2_000;
/// First pause after a stream failed; doubles up to [`RETRY_MAX_MS`].
const RETRY_MS: u64 = 1_000;
const RETRY_MAX_MS: u64 = 30_000;

/// What a data task tells the loop.
#[derive(Debug)]
pub enum Event {
    /// The node's stream to `peer` ended (`error`: why, if it failed).
    Ended {
        /// The anchor.
        peer: PeerId,
        /// Why it ended, if not cleanly.
        error: Option<String>,
    },
    /// A peer sent a batch that does not check.
    Security {
        /// Who.
        peer: PeerId,
        /// Why it was refused.
        reason: String,
    },
}

/// What moved, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    /// Node: batches sent.
    pub batches_sent: AtomicU64,
    /// Node: records sent (a resend counts again).
    pub records_sent: AtomicU64,
    /// Node: records acknowledged.
    pub records_acked: AtomicU64,
    /// Node: batch bytes written.
    pub bytes_sent: AtomicU64,
    /// Anchor: batches landed.
    pub batches_landed: AtomicU64,
    /// Anchor: records in them.
    pub records_landed: AtomicU64,
    /// Anchor: records that were new (not a replay).
    pub records_new: AtomicU64,
    /// Anchor: bytes of the batches landed.
    pub bytes_landed: AtomicU64,
    /// Anchor: batches refused.
    pub refused: AtomicU64,
}

/// What this daemon does on `/shoal/data/1`.
enum Mode {
    /// Sends its outbox up (an edge node), signing as this identity.
    Send(Box<Identity>),
    /// Lands what nodes send (an anchor); queues batches for an exporter
    /// when `export`.
    Land { export: bool },
}

/// The data streams of a daemon.
pub struct DataUp {
    mode: Mode,
    store: Arc<Store>,
    tx: mpsc::UnboundedSender<Event>,
    /// Node: wakes the stream when the store holds more.
    wake: Arc<Notify>,
    /// Node: anchors admitted now, in the order they came.
    anchors: Vec<PeerId>,
    /// Node: the anchor of the running stream.
    active: Option<PeerId>,
    /// Node: no stream starts before this (ms of the loop's clock).
    retry_at: u64,
    failures: u32,
    /// Node: records acknowledged when the last stream failed (a stream
    /// that got any acknowledged since starts the pauses over).
    acked_then: u64,
    /// Anchor: the fleet's trust as of the last tick.
    trust: watch::Sender<Trust>,
    /// Anchor: wakes the exporter.
    landed: Arc<Notify>,
    /// What moved.
    pub counters: Arc<Counters>,
}

impl DataUp {
    /// A node's: sends its store's outbox up, signed by `me`.
    pub fn send(store: Arc<Store>, me: Identity, tx: mpsc::UnboundedSender<Event>) -> DataUp {
        Self::new(
            Mode::Send(Box::new(me)),
            store,
            Trust::new(crdt_state::PublicKey([0; 32])),
            tx,
        )
    }

    /// An anchor's: lands what nodes of `trust` send; with `export`, queues
    /// each batch for the exporter too.
    pub fn land(
        store: Arc<Store>,
        trust: Trust,
        export: bool,
        tx: mpsc::UnboundedSender<Event>,
    ) -> DataUp {
        Self::new(Mode::Land { export }, store, trust, tx)
    }

    fn new(
        mode: Mode,
        store: Arc<Store>,
        trust: Trust,
        tx: mpsc::UnboundedSender<Event>,
    ) -> DataUp {
        DataUp {
            mode,
            store,
            tx,
            wake: Arc::new(Notify::new()),
            anchors: Vec::new(),
            active: None,
            retry_at: 0,
            failures: 0,
            acked_then: 0,
            trust: watch::Sender::new(trust),
            landed: Arc::new(Notify::new()),
            counters: Arc::default(),
        }
    }

    /// Whether this daemon lands data (serves `/shoal/data/1`).
    pub fn lands(&self) -> bool {
        matches!(self.mode, Mode::Land { .. })
    }

    /// Node: what to notify when the store holds new readings or records.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Anchor: notified each time a batch is queued for the exporter.
    pub fn landed(&self) -> Arc<Notify> {
        self.landed.clone()
    }

    /// The anchor a node's stream goes to now.
    pub fn active(&self) -> Option<PeerId> {
        self.active
    }

    /// A peer was admitted (`anchor`: an anchor's certificate).
    pub fn peer_up(&mut self, mesh: &Mesh, peer: PeerId, anchor: bool, now_ms: u64) {
        if anchor && matches!(self.mode, Mode::Send(_)) && !self.anchors.contains(&peer) {
            self.anchors.push(peer);
            self.maybe_start(mesh, now_ms);
        }
    }

    /// A peer left (its stream, if any, ends by itself).
    pub fn peer_down(&mut self, peer: PeerId) {
        self.anchors.retain(|p| *p != peer);
    }

    /// Anchor: the fleet's trust now (new certificates, revocations).
    pub fn set_trust(&self, trust: &Trust) {
        self.trust.send_replace(trust.clone());
    }

    /// About once a second: a node without a stream starts one when due.
    pub fn tick(&mut self, mesh: &Mesh, now_ms: u64) {
        self.maybe_start(mesh, now_ms);
    }

    /// A data task's event; returns a security event to log (who, why).
    pub fn on_event(&mut self, mesh: &Mesh, now_ms: u64, ev: Event) -> Option<(PeerId, String)> {
        match ev {
            Event::Ended { peer, error } => {
                if self.active == Some(peer) {
                    self.active = None;
                }
                match error {
                    Some(e) => {
                        let acked = self.counters.records_acked.load(Ordering::Relaxed);
                        if acked > self.acked_then {
                            self.failures = 0;
                        }
                        self.acked_then = acked;
                        self.failures = self.failures.saturating_add(1);
                        let pause = RETRY_MS
                            .saturating_mul(1 << self.failures.min(6).saturating_sub(1))
                            .min(RETRY_MAX_MS);
                        self.retry_at = now_ms + pause;
                        tracing::info!(%peer, error = %e, retry_ms = pause, "data stream ended");
                        // The next anchor is tried first next time.
                        if let Some(i) = self.anchors.iter().position(|p| *p == peer) {
                            let p = self.anchors.remove(i);
                            self.anchors.push(p);
                        }
                    }
                    None => self.retry_at = now_ms,
                }
                self.maybe_start(mesh, now_ms);
                None
            }
            Event::Security { peer, reason } => Some((peer, reason)),
        }
    }

    fn maybe_start(&mut self, mesh: &Mesh, now_ms: u64) {
        let Mode::Send(me) = &self.mode else { return };
        if self.active.is_some() || now_ms < self.retry_at {
            return;
        }
        let Some(peer) = self.anchors.first().copied() else {
            return;
        };
        self.active = Some(peer);
        let sender = Sender {
            mesh: mesh.clone(),
            peer,
            store: self.store.clone(),
            me: (**me).clone(),
            wake: self.wake.clone(),
            counters: self.counters.clone(),
        };
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let error = sender.run().await.err();
            let _ = tx.send(Event::Ended { peer, error });
        });
    }

    /// Anchor: reads an admitted node's stream until it ends.
    pub fn serve(&self, peer: PeerId, name: String, stream: mesh::Stream) {
        let Mode::Land { export } = self.mode else {
            return;
        };
        let lander = Lander {
            peer,
            name,
            store: self.store.clone(),
            trust: self.trust.subscribe(),
            export,
            tx: self.tx.clone(),
            landed: self.landed.clone(),
            counters: self.counters.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = lander.run(stream).await {
                tracing::debug!(%peer, error = %e, "data stream ended");
            }
        });
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a blocking task failed: {e}"))?
}

/// The node's end of one stream.
struct Sender {
    mesh: Mesh,
    peer: PeerId,
    store: Arc<Store>,
    me: Identity,
    wake: Arc<Notify>,
    counters: Arc<Counters>,
}

impl Sender {
    async fn run(self) -> Result<(), String> {
        let stream = self
            .mesh
            .open(self.peer, mesh::DATA)
            .await
            .map_err(|e| e.to_string())?;
        let (mut rd, mut wr) = stream.split();
        // Answers are read by a task of their own, so a wake never cuts a
        // frame in half.
        let (answers_tx, mut answers) = mpsc::channel::<Result<Answer, String>>(8);
        let reader = tokio::spawn(async move {
            loop {
                let a = match mesh::frame::read(&mut rd, MAX_ANSWER).await {
                    Ok(Some(b)) => Answer::decode(&b).map_err(|e| e.to_string()),
                    Ok(None) => Err("the anchor closed the stream".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let end = a.is_err();
                if answers_tx.send(a).await.is_err() || end {
                    break;
                }
            }
        });
        let r = self.pump(&mut wr, &mut answers).await;
        reader.abort();
        r
    }

    async fn pump(
        &self,
        wr: &mut futures::io::WriteHalf<mesh::Stream>,
        answers: &mut mpsc::Receiver<Result<Answer, String>>,
    ) -> Result<(), String> {
        let store = self.store.clone();
        let newest = blocking(move || store.readings_newest().map_err(|e| e.to_string())).await?;
        let mut up = Uplink::new(newest, 0);
        // The last answer (or when the window was last empty): an anchor
        // that holds batches longer than [`WAIT`] is given up, however
        // often the store wakes this loop meanwhile.
        let mut answered = tokio::time::Instant::now();
        loop {
            while let Some(read) = up.next_read() {
                let store = self.store.clone();
                let got = blocking(move || {
                    store
                        .outbox(read.from, read.limit)
                        .map_err(|e| e.to_string())
                })
                .await?;
                let (read, got) = fit(read, got);
                let seqs: Vec<u64> = got.iter().map(|o| o.seq).collect();
                let Some((number, take)) = up.sent(read, &seqs) else {
                    continue;
                };
                let me = self.me.clone();
                let records = take.len() as u64;
                let bytes = blocking(move || {
                    batch_of(&me, number, got, &take)
                        .encode(|m| me.sign(m))
                        .map_err(|e| e.to_string())
                })
                .await?;
                match tokio::time::timeout(WAIT, mesh::frame::write(wr, &bytes)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => {
                        return Err(format!("the anchor took no batch for {} s", WAIT.as_secs()));
                    }
                }
                // An anchor that died without closing is noticed in
                // seconds (the mesh probes it), not at QUIC's idle timeout.
                self.mesh.check(self.peer);
                self.counters.batches_sent.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .records_sent
                    .fetch_add(records, Ordering::Relaxed);
                self.counters
                    .bytes_sent
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            if up.in_flight() == 0 {
                answered = tokio::time::Instant::now();
            }
            let waiting = up.in_flight() > 0;
            tokio::select! {
                a = answers.recv() => match a {
                    Some(Ok(Answer::Ack { number, ranges })) => {
                        let Some(carried) = up.acked(number) else {
                            return Err(format!("an acknowledgement of batch {number}, which is not in flight"));
                        };
                        // Only what this batch carried is marked, whatever
                        // the anchor says.
                        let all = carried.len();
                        let covered: Vec<u64> = carried
                            .into_iter()
                            .filter(|s| ranges.iter().any(|(a, b)| a <= s && s <= b))
                            .collect();
                        let partial = covered.len() < all;
                        let ok = uplink::wire::ranges_of(covered);
                        let store = self.store.clone();
                        let moved = blocking(move || store.acknowledge(&ok).map_err(|e| e.to_string())).await?;
                        self.counters.records_acked.fetch_add(moved, Ordering::Relaxed);
                        answered = tokio::time::Instant::now();
                        if partial {
                            // What it left out is still in the outbox; a
                            // new stream reads it again.
                            return Err(format!("batch {number} was acknowledged in part"));
                        }
                    }
                    Some(Ok(Answer::Refused { number, reason })) => {
                        return Err(format!("batch {number} refused: {reason}"));
                    }
                    Some(Err(e)) => return Err(e),
                    None => return Err("the answers ended".into()),
                },
                _ = self.wake.notified() => {
                    let store = self.store.clone();
                    if let Some(n) = blocking(move || store.readings_newest().map_err(|e| e.to_string())).await? {
                        up.stored(n);
                    }
                }
                _ = tokio::time::sleep_until(answered + WAIT), if waiting => {
                    return Err(format!("no answer within {} s", WAIT.as_secs()));
                }
            }
        }
    }
}

/// What of `got` fits one batch: values within [`BATCH_BYTES`], at most
/// [`MAX_SERIES`] series and [`MAX_RUNS`] runs of consecutive sequence
/// numbers (the acknowledgement names each run); a cut read says so (its limit is what it kept),
/// so the planner goes on from there.
fn fit(read: Read, mut got: Vec<Outgoing>) -> (Read, Vec<Outgoing>) {
    let mut bytes = 0usize;
    let mut series = std::collections::HashSet::new();
    let mut runs = 0usize;
    let mut keep = got.len();
    for (i, o) in got.iter().enumerate() {
        bytes += o.value.len() + o.series.len() + 24;
        series.insert((o.series.as_str(), o.summary));
        if i == 0 || got[i - 1].seq + 1 != o.seq {
            runs += 1;
        }
        if i > 0 && (bytes > BATCH_BYTES || series.len() > MAX_SERIES || runs > MAX_RUNS) {
            keep = i;
            break;
        }
    }
    if keep < got.len() {
        got.truncate(keep);
        return (
            Read {
                limit: keep,
                ..read
            },
            got,
        );
    }
    (read, got)
}

/// The batch of the entries of `got` at positions `take`, by series.
fn batch_of(me: &Identity, number: u64, got: Vec<Outgoing>, take: &[usize]) -> Batch {
    let mut slots: Vec<Option<Outgoing>> = got.into_iter().map(Some).collect();
    let mut series: Vec<Series> = Vec::new();
    let mut index: std::collections::HashMap<(String, bool), usize> = Default::default();
    for &i in take {
        let Some(o) = slots.get_mut(i).and_then(Option::take) else {
            continue;
        };
        let at = *index
            .entry((o.series.clone(), o.summary))
            .or_insert_with(|| {
                series.push(Series {
                    name: o.series.clone(),
                    kind: if o.summary {
                        Kind::Summary
                    } else {
                        Kind::Reading
                    },
                    records: Vec::new(),
                });
                series.len() - 1
            });
        series[at].records.push(Record {
            seq: o.seq,
            at_ms: o.at_ms,
            value: o.value,
        });
    }
    Batch {
        node: me.key().0,
        number,
        series,
    }
}

/// The anchor's end of one node's stream.
struct Lander {
    peer: PeerId,
    name: String,
    store: Arc<Store>,
    trust: watch::Receiver<Trust>,
    export: bool,
    tx: mpsc::UnboundedSender<Event>,
    landed: Arc<Notify>,
    counters: Arc<Counters>,
}

impl Lander {
    async fn run(self, mut stream: mesh::Stream) -> Result<(), String> {
        loop {
            // No deadline on the next batch: a node with nothing to send
            // keeps its stream; QUIC notices a dead peer.
            let Some(bytes) = mesh::frame::read(&mut stream, MAX_BATCH)
                .await
                .map_err(|e| e.to_string())?
            else {
                return Ok(());
            };
            let size = bytes.len() as u64;
            let trust = self.trust.borrow().clone();
            let store = self.store.clone();
            let export = self.export;
            let outcome = blocking(move || {
                let accepted = match crate::data::accept(&trust, &bytes) {
                    Ok(a) => a,
                    Err(r) => return Ok(Err((r, true))),
                };
                let queued = export.then_some(bytes.as_slice());
                match store.land(&accepted.node, &accepted.records, queued) {
                    Ok(new) => Ok(Ok((accepted, new))),
                    Err(e) => Ok(Err((
                        crate::data::Refusal {
                            number: Some(accepted.number),
                            reason: format!("the anchor cannot store it now: {e}"),
                        },
                        false,
                    ))),
                }
            })
            .await?;
            let answer = match outcome {
                Ok((accepted, new)) => {
                    let c = &self.counters;
                    c.batches_landed.fetch_add(1, Ordering::Relaxed);
                    c.records_landed
                        .fetch_add(accepted.records.len() as u64, Ordering::Relaxed);
                    c.records_new.fetch_add(new, Ordering::Relaxed);
                    c.bytes_landed.fetch_add(size, Ordering::Relaxed);
                    if self.export {
                        self.landed.notify_one();
                    }
                    if accepted.node != self.name {
                        tracing::debug!(peer = %self.peer, node = %accepted.node, "a batch carried for another node");
                    }
                    // A node reads at most MAX_RANGES; it marks only what
                    // the batch carried, so one covering range is as good.
                    let ranges = if accepted.ranges.len() > uplink::wire::MAX_RANGES {
                        let lo = accepted.ranges.first().map_or(0, |r| r.0);
                        let hi = accepted.ranges.last().map_or(0, |r| r.1);
                        vec![(lo, hi)]
                    } else {
                        accepted.ranges
                    };
                    Answer::Ack {
                        number: accepted.number,
                        ranges,
                    }
                }
                Err((refusal, security)) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    if security {
                        let _ = self.tx.send(Event::Security {
                            peer: self.peer,
                            reason: format!("data batch refused: {}", refusal.reason),
                        });
                    } else {
                        tracing::warn!(peer = %self.peer, reason = %refusal.reason, "data batch not stored");
                    }
                    let answer = Answer::Refused {
                        number: refusal.number.unwrap_or(0),
                        reason: refusal.reason.clone(),
                    };
                    let _ = tokio::time::timeout(
                        WAIT,
                        mesh::frame::write(&mut stream, &answer.encode()),
                    )
                    .await;
                    let _ = futures::AsyncWriteExt::close(&mut stream).await;
                    return Err(refusal.reason);
                }
            };
            match tokio::time::timeout(WAIT, mesh::frame::write(&mut stream, &answer.encode()))
                .await
            {
                Ok(r) => r.map_err(|e| e.to_string())?,
                Err(_) => return Err(format!("the node took no answer for {} s", WAIT.as_secs())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(seq: u64, series: &str, value: usize) -> Outgoing {
        Outgoing {
            seq,
            series: series.into(),
            at_ms: seq * 1000,
            value: vec![b'1'; value],
            summary: false,
        }
    }

    /// A read is cut where its values would pass the batch's bytes or
    /// series bounds, and says so (the planner goes on from the cut); a
    /// read that fits is left as it is.
    #[test]
    fn reads_are_cut_to_what_fits_a_batch() {
        let read = Read {
            from: 0,
            limit: 100,
            live: false,
        };
        let small: Vec<Outgoing> = (0..10).map(|i| out(i, "d/a", 4)).collect();
        let (r, got) = fit(read, small);
        assert_eq!((r, got.len()), (read, 10));
        let big: Vec<Outgoing> = (0..40).map(|i| out(i, "app/x/y", 60_000)).collect();
        let (r, got) = fit(read, big);
        assert!(got.len() < 40 && got.len() > 1);
        assert_eq!(r.limit, got.len());
        let many: Vec<Outgoing> = (0..5000).map(|i| out(i, &format!("d/{i}"), 1)).collect();
        let (_, got) = fit(read, many);
        assert_eq!(got.len(), MAX_SERIES);
        // Every other sequence number (summaries between dropped
        // readings): cut at MAX_RUNS runs.
        let sparse: Vec<Outgoing> = (0..10_000).map(|i| out(i * 2, "d/a", 1)).collect();
        let (r, got) = fit(read, sparse);
        assert_eq!(got.len(), MAX_RUNS);
        assert_eq!(r.limit, MAX_RUNS);
        // One value alone always goes, whatever its size.
        let (_, got) = fit(read, vec![out(0, "a/b", 900_000)]);
        assert_eq!(got.len(), 1);
    }

    /// Entries become one series per (name, kind), records in sequence
    /// order, only those taken.
    #[test]
    fn batches_group_by_series_and_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dd = crdt_state::DataDir::init(tmp.path(), "f", 1).unwrap();
        let me = dd
            .create_identity(crdt_state::Role::Node, Some("s"), "n1", 1)
            .unwrap();
        let mut got: Vec<Outgoing> = (0..6)
            .map(|i| out(i, if i % 2 == 0 { "d/a" } else { "d/b" }, 2))
            .collect();
        got[4].summary = true;
        let b = batch_of(&me, 3, got, &[0, 1, 2, 4, 5]);
        assert_eq!(b.number, 3);
        let shape: Vec<(&str, Kind, Vec<u64>)> = b
            .series
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.kind,
                    s.records.iter().map(|r| r.seq).collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("d/a", Kind::Reading, vec![0, 2]),
                ("d/b", Kind::Reading, vec![1, 5]),
                ("d/a", Kind::Summary, vec![4]),
            ]
        );
        assert!(b.encode(|m| me.sign(m)).is_ok());
    }
}
