//! Blobs in a running daemon: `/shoal/blob/1` answered from the data dir's
//! blob store, and the fetches of the blobs this daemon wants, each a
//! [`blobs::fetch::Fetch`] driven over the mesh.
//!
//! Every request is a stream of its own, run on a blocking thread (files
//! are read and written there, never on the loop): the asker writes the
//! request, then reads the answer frame by frame; for a run of groups it
//! reads through one buffer of [`READ_BUFFER`] bytes and checks and writes
//! the groups it holds before it reads more, so a transfer holds that
//! buffer in memory and the disk's pace reaches the sender through QUIC's
//! flow control. What each request brought is reported to the loop
//! through one channel ([`crate::driver::Input::Blob`]). Only admitted
//! peers are answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blobs::fetch::Fetch;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use blobs::wire::{Answer, GROUP_HEADER, MAX_ANSWER, MAX_REQUEST, Request, group_header};
use blobs::{BlobStore, Cvs, Hash, Partial};
use mesh::{Mesh, PeerId};
use tokio::sync::mpsc;

/// Groups written before the loop hears of them (at most; a run's end, a
/// refusal or an error reports at once).
const REPORT_EVERY: usize = 16;

/// The buffer a stream of groups is read through: one read of the stream
/// takes whatever it holds, up to this much (16 groups with their
/// headers, less a few bytes).
const READ_BUFFER: usize = 256 * 1024;

/// How long a frame may take to arrive or leave before the stream is
/// given up (a stalled peer; the fetch asks someone else).
const FRAME_WAIT: Duration = Duration::from_secs(30);

/// How long a blob that could not be kept waits before it is tried again.
pub const RETRY_REFUSED_MS: u64 = 10 * 60 * 1000;

/// What a blob task reports to the loop.
#[derive(Debug)]
pub enum Event {
    /// An answer (or a failure) to a request of a fetch.
    Answered {
        /// The blob.
        hash: Hash,
        /// The peer asked.
        peer: PeerId,
        /// The request.
        req: Request,
        /// The answer's bytes, or why there is none.
        result: Result<Vec<u8>, String>,
    },
    /// A partial blob opened (resumed or begun).
    Opened {
        /// The blob.
        hash: Hash,
        /// What it holds, or why it could not be opened.
        result: Result<(Cvs, Vec<bool>), String>,
    },
    /// Groups of a run read, checked and written (reported up to
    /// [`REPORT_EVERY`] at a time: one wake of the loop per batch, not per
    /// group).
    Written {
        /// The blob.
        hash: Hash,
        /// Who sent them.
        peer: PeerId,
        /// Each group, and whether it was verified and written, refused
        /// (it does not verify), or not written (`None`: the partial file
        /// was not open, or a disk error; asked again, nobody blamed).
        groups: Vec<(u64, Option<bool>)>,
    },
    /// The stream of a run of groups ended (`error`: it broke).
    Ended {
        /// The blob.
        hash: Hash,
        /// The peer asked.
        peer: PeerId,
        /// The request.
        req: Request,
        /// Why it broke, if it did.
        error: Option<String>,
    },
    /// A stream of `groups` requests broke: its queue is dropped (what is
    /// still in it ends with the error).
    Gone {
        /// The blob.
        hash: Hash,
        /// The peer.
        peer: PeerId,
    },
    /// The partial file of a blob whose group hashes just arrived is open:
    /// its groups may be asked for.
    Begun {
        /// The blob.
        hash: Hash,
    },
    /// A whole blob made available (or why not).
    Finished {
        /// The blob.
        hash: Hash,
        /// Its path, or the error.
        result: Result<std::path::PathBuf, String>,
    },
}

/// What the loop should do after a blob event.
#[derive(Debug, Default)]
pub struct Outcome {
    /// A peer sent bytes that do not verify: (who, what).
    pub security: Vec<(PeerId, String)>,
    /// A wanted blob is whole now.
    pub ready: Vec<Hash>,
}

/// The blobs of one daemon.
pub struct Blobs {
    store: Arc<BlobStore>,
    /// Blobs being fetched: the partial files, shared with the threads that
    /// write them and those that serve them.
    partials: Arc<Mutex<HashMap<Hash, Partial>>>,
    fetches: HashMap<Hash, Fetch<PeerId>>,
    /// Blobs wanted but not opened yet (size), while their partial file is
    /// hashed on a blocking thread.
    opening: HashMap<Hash, u64>,
    /// Admitted peers and whether each is an anchor.
    peers: HashMap<PeerId, bool>,
    /// Blobs that could not be kept here (the quota, the disk), when and
    /// why: not fetched again for [`RETRY_REFUSED_MS`].
    refused: HashMap<Hash, (u64, String)>,
    /// The queue of `groups` requests of each stream to a peer for a blob
    /// (dropped when the fetch ends or the peer leaves: the stream closes).
    streams: HashMap<(Hash, PeerId), std::sync::mpsc::Sender<Request>>,
    /// Blobs whose group hashes are known but whose partial file is being
    /// opened: no group is asked for until it is.
    beginning: std::collections::HashSet<Hash>,
    tx: mpsc::UnboundedSender<Event>,
    now_ms: u64,
    /// Bytes of groups sent to peers and received from them (for the
    /// figures and the metrics).
    counters: Arc<Counters>,
    /// Verified bytes of each blob fetched here, per peer they came from
    /// (since the start; for the node's report).
    from: HashMap<Hash, HashMap<PeerId, u64>>,
    /// Blobs in use here (an app runs with them) that collection keeps
    /// even when no artifact names them any more.
    pinned: std::collections::HashSet<Hash>,
    /// Streams of groups served at once ([`MAX_SERVING`] by default).
    pub max_serving: usize,
}

/// How far a wanted blob is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Bytes held and verified.
    pub held: u64,
    /// Verified bytes per peer they came from, since the start.
    pub from: Vec<(PeerId, u64)>,
    /// Why it is not kept here (the quota), if so.
    pub error: Option<String>,
}

/// Bytes moved on `/shoal/blob/1`, since the start.
#[derive(Debug, Default)]
pub struct Counters {
    /// Group bytes written to peers' streams.
    pub served: AtomicU64,
    /// Everything written to peers' streams as a holder: every frame of
    /// every answer with its header (groups, group hashes, `have`s).
    pub served_wire: AtomicU64,
    /// Group bytes read from peers' streams (verified or not).
    pub received: AtomicU64,
    /// Everything written to peers' streams as a fetcher (the requests).
    pub asked_wire: AtomicU64,
    /// Streams of groups being served now.
    pub serving: std::sync::atomic::AtomicUsize,
    /// Streams of groups turned away because [`Blobs::max_serving`] were
    /// being served.
    pub busy: AtomicU64,
}

/// Streams of groups a daemon serves at once, by default: each holds a
/// blocking thread while it runs (tokio's pool has 512, which the
/// daemon's other file work shares). A peer asking beyond it is told it is
/// busy ([`blobs::wire::BUSY`]) and comes back after a few seconds, or
/// takes the groups from its neighbours meanwhile. 128 streams of 16 KiB
/// frames keep any uplink full; an anchor of 10,000 nodes serves a new
/// model to its sites in turns, each site's nodes sharing what one of
/// them got.
pub const MAX_SERVING: usize = 128;

impl Blobs {
    /// Blobs over `store`; events come back on `tx`.
    pub fn new(store: BlobStore, tx: mpsc::UnboundedSender<Event>) -> Blobs {
        Blobs {
            store: Arc::new(store),
            partials: Arc::new(Mutex::new(HashMap::new())),
            fetches: HashMap::new(),
            opening: HashMap::new(),
            peers: HashMap::new(),
            refused: HashMap::new(),
            beginning: Default::default(),
            streams: HashMap::new(),
            tx,
            now_ms: 0,
            counters: Arc::default(),
            from: HashMap::new(),
            pinned: Default::default(),
            max_serving: MAX_SERVING,
        }
    }

    /// Blobs in use here, kept by collection whatever the documents say.
    pub fn pin(&mut self, in_use: std::collections::HashSet<Hash>) {
        self.pinned = in_use;
    }

    /// How far blob `hash` (`size` bytes) is here.
    pub fn progress(&self, hash: &Hash, size: u64) -> Progress {
        let held = if self.store.has(hash) {
            size
        } else {
            self.fetches.get(hash).map(|f| f.held_bytes()).unwrap_or(0)
        };
        let mut from: Vec<(PeerId, u64)> = self
            .from
            .get(hash)
            .map(|m| m.iter().map(|(p, b)| (*p, *b)).collect())
            .unwrap_or_default();
        from.sort();
        Progress {
            held,
            from,
            error: self.refused.get(hash).map(|(_, e)| e.clone()),
        }
    }

    /// Bytes of groups moved so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The store.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// The store, for another part of the daemon that adds to it (the
    /// anchor's upload route): one store, one quota.
    pub fn shared_store(&self) -> Arc<BlobStore> {
        self.store.clone()
    }

    /// A peer was admitted.
    pub fn peer_up(&mut self, mesh: &Mesh, peer: PeerId, anchor: bool) {
        self.peers.insert(peer, anchor);
        for f in self.fetches.values_mut() {
            f.peer_up(self.now_ms, peer, anchor);
        }
        self.send(mesh);
    }

    /// A peer is gone.
    pub fn peer_down(&mut self, mesh: &Mesh, peer: PeerId) {
        self.peers.remove(&peer);
        self.streams.retain(|(_, p), _| *p != peer);
        for f in self.fetches.values_mut() {
            f.peer_down(peer);
        }
        self.send(mesh);
    }

    /// Fetches `hash` (`size` bytes) unless it is whole here, on its way,
    /// or was refused (the quota) less than [`RETRY_REFUSED_MS`] ago.
    pub fn want(&mut self, hash: Hash, size: u64) {
        if self.store.has(&hash)
            || self.fetches.contains_key(&hash)
            || self.opening.contains_key(&hash)
        {
            return;
        }
        if let Some((at, _)) = self.refused.get(&hash) {
            if self.now_ms.saturating_sub(*at) < RETRY_REFUSED_MS {
                return;
            }
            self.refused.remove(&hash);
        }
        self.opening.insert(hash, size);
        let store = self.store.clone();
        let partials = self.partials.clone();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = match store.resume(&hash, size) {
                Ok(Some(p)) => {
                    let held: Vec<bool> = (0..p.cvs().groups()).map(|g| p.has(g)).collect();
                    let cvs = p.cvs().clone();
                    if let Ok(mut m) = partials.lock() {
                        m.insert(hash, p);
                    }
                    Ok((cvs, held))
                }
                Ok(None) => Err(String::new()),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(Event::Opened { hash, result });
        });
    }

    /// Stops fetching what is not in `wanted` (an app no longer names it):
    /// its partial file stays until [`Blobs::collect`] removes it.
    pub fn keep_only(&mut self, wanted: &std::collections::HashSet<Hash>) {
        let gone: Vec<Hash> = self
            .fetches
            .keys()
            .chain(self.opening.keys())
            .filter(|h| !wanted.contains(*h))
            .copied()
            .collect();
        for h in gone {
            tracing::info!(blob = %h.short(), "blob no longer wanted; its fetch stops");
            self.fetches.remove(&h);
            self.opening.remove(&h);
            self.beginning.remove(&h);
            self.streams.retain(|(x, _), _| *x != h);
            if let Ok(mut m) = self.partials.lock() {
                m.remove(&h);
            }
        }
    }

    /// Removes, on a blocking thread, every blob (whole or partial) that no
    /// artifact in `named` is, that is not being fetched or pinned, and that
    /// was not written within `grace` (a push copies the blob before it applies
    /// its Artifact).
    pub fn collect(&self, named: std::collections::HashSet<Hash>, grace: Duration) {
        let store = self.store.clone();
        let fetching: std::collections::HashSet<Hash> = self
            .fetches
            .keys()
            .chain(self.opening.keys())
            .chain(self.pinned.iter())
            .copied()
            .collect();
        tokio::task::spawn_blocking(move || {
            let now = std::time::SystemTime::now();
            let keep = |h: &Hash| {
                named.contains(h)
                    || fetching.contains(h)
                    || store
                        .modified(h)
                        .is_some_and(|t| now.duration_since(t).unwrap_or_default() < grace)
            };
            match store.collect(&keep) {
                Ok(0) => {}
                Ok(freed) => tracing::info!(freed, "blobs no artifact names removed"),
                Err(e) => tracing::warn!(error = %e, "blobs not collected"),
            }
        });
    }

    /// Time passes.
    pub fn tick(&mut self, mesh: &Mesh, now_ms: u64) {
        self.now_ms = now_ms;
        for f in self.fetches.values_mut() {
            f.tick(now_ms);
        }
        self.send(mesh);
    }

    /// Sends what the fetches ask for: a `have` or `cvs` request on a
    /// stream of its own; `groups` requests on one stream per blob and
    /// peer, queued behind each other (the holder answers them in order,
    /// so the groups flow without a pause between runs and the receiver
    /// reads one group at a time). Each stream is run by a blocking thread.
    fn send(&mut self, mesh: &Mesh) {
        let mut asks = Vec::new();
        for (hash, f) in self.fetches.iter_mut() {
            if self.beginning.contains(hash) {
                continue;
            }
            while let Some((peer, req)) = f.poll() {
                asks.push((*hash, peer, req));
            }
        }
        for (hash, peer, req) in asks {
            let mesh = mesh.clone();
            let tx = self.tx.clone();
            let partials = self.partials.clone();
            let counters = self.counters.clone();
            let handle = tokio::runtime::Handle::current();
            let span = tracing::debug_span!("blob_ask", %peer, blob = %hash.short());
            if !matches!(req, Request::Groups { .. }) {
                tokio::task::spawn_blocking(move || {
                    let _entered = span.enter();
                    ask_once(&handle, &mesh, peer, req, &counters, &tx);
                });
                continue;
            }
            let req = match self.streams.get(&(hash, peer)) {
                Some(q) => match q.send(req) {
                    Ok(()) => continue,
                    // The stream's thread is gone: a new one.
                    Err(back) => back.0,
                },
                None => req,
            };
            let (queue, requests) = std::sync::mpsc::channel();
            let _ = queue.send(req);
            self.streams.insert((hash, peer), queue);
            tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                let s = GroupStream {
                    handle: &handle,
                    hash,
                    peer,
                    partials: &partials,
                    counters: &counters,
                    tx: &tx,
                };
                s.run(&mesh, requests);
            });
        }
    }

    /// Handles what a task reported (`now_ms`: the daemon's clock).
    pub fn on_event(&mut self, mesh: &Mesh, now_ms: u64, ev: Event) -> Outcome {
        self.now_ms = self.now_ms.max(now_ms);
        let mut out = Outcome::default();
        let hash = match &ev {
            Event::Answered { hash, .. }
            | Event::Opened { hash, .. }
            | Event::Written { hash, .. }
            | Event::Ended { hash, .. }
            | Event::Gone { hash, .. }
            | Event::Begun { hash }
            | Event::Finished { hash, .. } => *hash,
        };
        if let Some(f) = self.fetches.get_mut(&hash) {
            f.at(self.now_ms);
        }
        match ev {
            Event::Opened { hash, result } => {
                let Some(size) = self.opening.remove(&hash) else {
                    return out;
                };
                let resumed = result.ok();
                let mut f = Fetch::new(hash, size, mesh.peer_id(), resumed);
                for (p, anchor) in &self.peers {
                    f.peer_up(self.now_ms, *p, *anchor);
                }
                if f.is_complete() {
                    self.finish(hash);
                }
                self.fetches.insert(hash, f);
            }
            Event::Answered {
                hash,
                peer,
                req,
                result,
            } => {
                let Some(f) = self.fetches.get_mut(&hash) else {
                    return out;
                };
                let answer =
                    result.and_then(|b| Answer::decode(&req, &b).map_err(|e| e.to_string()));
                match answer {
                    Err(e) => {
                        tracing::debug!(%peer, blob = %hash.short(), error = %e, "blob request failed");
                        f.failed(peer, &req);
                    }
                    Ok(a) => {
                        let got = f.answer(self.now_ms, peer, &req, a);
                        if let Some(why) = got.misbehaved {
                            out.security.push((peer, why));
                        }
                        if let Some(cvs) = got.cvs {
                            self.beginning.insert(hash);
                            self.begin(hash, cvs);
                        }
                    }
                }
            }
            Event::Begun { hash } => {
                self.beginning.remove(&hash);
            }
            Event::Written { hash, peer, groups } => {
                if let Some(f) = self.fetches.get_mut(&hash) {
                    for (group, ok) in groups {
                        if ok == Some(true) && !f.has(group) {
                            let r = blobs::tree::group_range(f.size(), group);
                            *self.from.entry(hash).or_default().entry(peer).or_default() +=
                                r.end - r.start;
                        }
                        match ok {
                            Some(ok) => {
                                if let Some(why) = f.group_done(peer, group, ok) {
                                    out.security.push((peer, why));
                                }
                            }
                            None => f.not_written(peer, group),
                        }
                    }
                    if f.is_complete() {
                        self.finish(hash);
                    }
                }
            }
            Event::Gone { hash, peer } => {
                // Its thread answers what is still queued, then ends.
                self.streams.remove(&(hash, peer));
            }
            Event::Ended {
                hash,
                peer,
                req,
                error,
            } => {
                if let Some(f) = self.fetches.get_mut(&hash) {
                    match error {
                        Some(e) => {
                            tracing::debug!(%peer, blob = %hash.short(), error = %e, "blob stream broke");
                            f.failed(peer, &req);
                        }
                        None => f.ended(peer, &req),
                    }
                }
            }
            Event::Finished { hash, result } => {
                self.fetches.remove(&hash);
                self.beginning.remove(&hash);
                self.streams.retain(|(h, _), _| *h != hash);
                match result {
                    Ok(path) => {
                        tracing::info!(blob = %hash.short(), path = %path.display(), "blob whole and verified");
                        out.ready.push(hash);
                    }
                    Err(e) => {
                        tracing::warn!(blob = %hash.short(), error = %e, "blob not kept here");
                        self.refused.insert(hash, (self.now_ms, e));
                    }
                }
            }
        }
        self.send(mesh);
        out
    }

    /// Opens the partial file once the group hashes are known; a blob that
    /// does not fit (the quota) ends its fetch before any group is asked
    /// for again.
    fn begin(&self, hash: Hash, cvs: Cvs) {
        let store = self.store.clone();
        let partials = self.partials.clone();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || match store.begin(cvs) {
            Ok(p) => {
                if let Ok(mut m) = partials.lock() {
                    m.insert(hash, p);
                }
                let _ = tx.send(Event::Begun { hash });
            }
            Err(e) => {
                let _ = tx.send(Event::Finished {
                    hash,
                    result: Err(e.to_string()),
                });
            }
        });
    }

    fn finish(&self, hash: Hash) {
        let store = self.store.clone();
        let partials = self.partials.clone();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let p = partials.lock().ok().and_then(|mut m| m.remove(&hash));
            let result = match p {
                Some(p) => p.finish(&store).map_err(|e| e.to_string()),
                None if store.has(&hash) => Ok(store.path(&hash)),
                None => Err("no partial blob to finish".into()),
            };
            let _ = tx.send(Event::Finished { hash, result });
        });
    }

    /// Answers a peer's stream (admitted or not: `admitted` says) on a
    /// blocking thread.
    pub fn serve(&self, admitted: bool, peer: PeerId, stream: mesh::Stream) {
        let store = self.store.clone();
        let partials = self.partials.clone();
        let counters = self.counters.clone();
        let max = self.max_serving;
        let handle = tokio::runtime::Handle::current();
        let span = tracing::debug_span!("blob_serve", %peer);
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let serving = Serving {
                admitted,
                max,
                counters: &counters,
            };
            if let Err(e) = serve(&handle, &serving, stream, &store, &partials) {
                tracing::debug!(error = %e, "blob stream ended early");
            }
        });
    }
}

/// Reads one frame within [`FRAME_WAIT`] (from a blocking thread).
fn read_frame<S: futures::AsyncRead + Unpin>(
    handle: &tokio::runtime::Handle,
    stream: &mut S,
    max: usize,
) -> Result<Option<Vec<u8>>, String> {
    handle.block_on(async {
        match tokio::time::timeout(FRAME_WAIT, mesh::frame::read(stream, max)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no frame within {} s", FRAME_WAIT.as_secs())),
        }
    })
}

/// Reads one frame through `frames` (from a blocking thread): taken from
/// what the buffer holds without a wait if it is there, else read
/// ([`mesh::frame::Buffered::read`]) within [`FRAME_WAIT`].
fn read_buffered<'b, S: futures::AsyncRead + Unpin>(
    handle: &tokio::runtime::Handle,
    frames: &'b mut mesh::frame::Buffered,
    stream: &mut S,
    max: usize,
) -> Result<Option<&'b [u8]>, String> {
    if frames.has_frame(max).map_err(|e| e.to_string())? {
        return frames.frame(max).map_err(|e| e.to_string());
    }
    handle.block_on(async move {
        match tokio::time::timeout(FRAME_WAIT, frames.read(stream, max)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no frame within {} s", FRAME_WAIT.as_secs())),
        }
    })
}

/// Writes one frame within [`FRAME_WAIT`] (from a blocking thread).
fn write_frame<S: futures::AsyncWrite + Unpin>(
    handle: &tokio::runtime::Handle,
    stream: &mut S,
    bytes: &[u8],
) -> Result<(), String> {
    handle.block_on(async {
        match tokio::time::timeout(FRAME_WAIT, mesh::frame::write(stream, bytes)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the peer took no frame for {} s",
                FRAME_WAIT.as_secs()
            )),
        }
    })
}

/// Asks `peer` a `have` or `cvs` request on a stream of its own and
/// reports the answer.
fn ask_once(
    handle: &tokio::runtime::Handle,
    mesh: &Mesh,
    peer: PeerId,
    req: Request,
    counters: &Counters,
    tx: &mpsc::UnboundedSender<Event>,
) {
    let hash = req.hash();
    let result = handle
        .block_on(mesh.open(peer, mesh::BLOB))
        .map_err(|e| e.to_string())
        .and_then(|mut s| {
            write_request(handle, &mut s, &req, counters)?;
            let answer = read_frame(handle, &mut s, MAX_ANSWER)?
                .ok_or_else(|| "the peer closed the stream without an answer".to_string());
            let _ = handle.block_on(futures::AsyncWriteExt::close(&mut s));
            answer
        });
    let _ = tx.send(Event::Answered {
        hash,
        peer,
        req,
        result,
    });
}

fn write_request<S: futures::AsyncWrite + Unpin>(
    handle: &tokio::runtime::Handle,
    stream: &mut S,
    req: &Request,
    counters: &Counters,
) -> Result<(), String> {
    let bytes = req.encode();
    counters.asked_wire.fetch_add(
        (bytes.len() + mesh::frame::HEADER) as u64,
        Ordering::Relaxed,
    );
    write_frame(handle, stream, &bytes)
}

/// The stream of `groups` requests to one peer for one blob, on a blocking
/// thread: requests are written as they come (the holder answers them in
/// order), answers read one group at a time, each group checked and
/// written before the next is read.
struct GroupStream<'a> {
    handle: &'a tokio::runtime::Handle,
    hash: Hash,
    peer: PeerId,
    partials: &'a Mutex<HashMap<Hash, Partial>>,
    counters: &'a Counters,
    tx: &'a mpsc::UnboundedSender<Event>,
}

impl GroupStream<'_> {
    fn run(&self, mesh: &Mesh, requests: std::sync::mpsc::Receiver<Request>) {
        let mut queued: std::collections::VecDeque<Request> = Default::default();
        let error = match self.handle.block_on(mesh.open(self.peer, mesh::BLOB)) {
            Ok(mut stream) => self.pump(&mut stream, &requests, &mut queued),
            Err(e) => e.to_string(),
        };
        // Broken (or never opened): what was asked ends with the error, and
        // so does what is still queued until the loop drops the queue.
        let _ = self.tx.send(Event::Gone {
            hash: self.hash,
            peer: self.peer,
        });
        for req in queued.into_iter().chain(requests.iter()) {
            self.ended(req, Some(error.clone()));
        }
    }

    fn ended(&self, req: Request, error: Option<String>) {
        let _ = self.tx.send(Event::Ended {
            hash: self.hash,
            peer: self.peer,
            req,
            error,
        });
    }

    /// Writes requests and reads answers until the queue is dropped (then
    /// closes the stream) or the stream breaks (returns why).
    fn pump(
        &self,
        stream: &mut mesh::Stream,
        requests: &std::sync::mpsc::Receiver<Request>,
        queued: &mut std::collections::VecDeque<Request>,
    ) -> String {
        // Answers are read through one buffer for the stream's life: what
        // is read past one run's last group begins the next run's.
        let mut frames = mesh::frame::Buffered::new(READ_BUFFER);
        loop {
            // Everything asked so far goes out at once.
            loop {
                let next = if queued.is_empty() {
                    // Idle: wait for the next request, or the end.
                    match requests.recv() {
                        Ok(r) => Ok(r),
                        Err(_) => {
                            let _ = self.handle.block_on(futures::AsyncWriteExt::close(stream));
                            return String::new();
                        }
                    }
                } else {
                    requests.try_recv().map_err(|_| ())
                };
                let Ok(req) = next else { break };
                if let Err(e) = write_request(self.handle, stream, &req, self.counters) {
                    queued.push_back(req);
                    return e;
                }
                queued.push_back(req);
            }
            let Some(req) = queued.front().cloned() else {
                continue;
            };
            match self.read_run(stream, &mut frames, &req, requests, queued) {
                Ok(()) => {
                    queued.pop_front();
                    self.ended(req, None);
                }
                Err(e) => return e,
            }
        }
    }

    /// Reads the answer to one `groups` request; requests that come
    /// meanwhile are written at once, so the holder has the next run before
    /// it finishes this one.
    fn read_run(
        &self,
        stream: &mut mesh::Stream,
        frames: &mut mesh::frame::Buffered,
        req: &Request,
        requests: &std::sync::mpsc::Receiver<Request>,
        queued: &mut std::collections::VecDeque<Request>,
    ) -> Result<(), String> {
        let mut written = Vec::new();
        let r = self.read_groups(stream, frames, req, &mut written, requests, queued);
        self.report(&mut written);
        r
    }

    /// Reports the groups written so far to the loop.
    fn report(&self, written: &mut Vec<(u64, Option<bool>)>) {
        if !written.is_empty() {
            let _ = self.tx.send(Event::Written {
                hash: self.hash,
                peer: self.peer,
                groups: std::mem::take(written),
            });
        }
    }

    /// Writes the requests that came since the last look.
    fn ask_queued(
        &self,
        stream: &mut mesh::Stream,
        requests: &std::sync::mpsc::Receiver<Request>,
        queued: &mut std::collections::VecDeque<Request>,
    ) -> Result<(), String> {
        while let Ok(next) = requests.try_recv() {
            let r = write_request(self.handle, stream, &next, self.counters);
            queued.push_back(next);
            r?;
        }
        Ok(())
    }

    fn read_groups(
        &self,
        stream: &mut mesh::Stream,
        frames: &mut mesh::frame::Buffered,
        req: &Request,
        written: &mut Vec<(u64, Option<bool>)>,
        requests: &std::sync::mpsc::Receiver<Request>,
        queued: &mut std::collections::VecDeque<Request>,
    ) -> Result<(), String> {
        let hash = self.hash;
        let mut i = 0;
        while let Some(one) = req.group(i) {
            i += 1;
            let frame = read_buffered(self.handle, frames, stream, MAX_ANSWER)?
                .ok_or_else(|| "the peer closed the stream inside a run".to_string())?;
            let Request::Groups { from, .. } = one else {
                break;
            };
            match blobs::wire::groups_in(&one, frame).map_err(|e| e.to_string())? {
                Some(data) => {
                    self.counters
                        .received
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    tracing::debug!(group = from, bytes = data.len(), "blob group received");
                    let ok = write_group(self.partials, &hash, from, data);
                    written.push((from, ok));
                    if written.len() >= REPORT_EVERY {
                        self.report(written);
                    }
                    if ok == Some(false) {
                        // A peer that lied is read no further.
                        return Err(format!("group {from} does not match its hash"));
                    }
                    self.ask_queued(stream, requests, queued)?;
                }
                None => {
                    // Told why it stops: the fetch forgets what it said it
                    // held; the rest of the run is asked elsewhere.
                    let refused = Answer::decode(&one, frame).map_err(|e| e.to_string())?;
                    self.report(written);
                    let _ = self.tx.send(Event::Answered {
                        hash,
                        peer: self.peer,
                        req: req.clone(),
                        result: Ok(refused.encode()),
                    });
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Checks and writes one group into its partial blob.
fn write_group(
    partials: &Mutex<HashMap<Hash, Partial>>,
    hash: &Hash,
    g: u64,
    data: &[u8],
) -> Option<bool> {
    let mut guard = partials.lock().ok()?;
    let p = guard.get_mut(hash)?;
    match p.write_group(g, data) {
        Ok(()) => Some(true),
        Err(blobs::store::Error::Mismatch { .. }) => Some(false),
        Err(e) => {
            tracing::warn!(blob = %hash.short(), error = %e, "group not written");
            None
        }
    }
}

/// Who a stream is served to, and within what limit.
struct Serving<'a> {
    admitted: bool,
    max: usize,
    counters: &'a Counters,
}

/// One of the [`Serving::max`] places of streams of groups, given back
/// when dropped.
struct Place<'a>(&'a std::sync::atomic::AtomicUsize);

impl Place<'_> {
    fn take(count: &std::sync::atomic::AtomicUsize, max: usize) -> Option<Place<'_>> {
        let before = count.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Place(count))
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers one stream: a request, then its frames.
fn serve(
    handle: &tokio::runtime::Handle,
    serving: &Serving<'_>,
    mut stream: mesh::Stream,
    store: &BlobStore,
    partials: &Mutex<HashMap<Hash, Partial>>,
) -> Result<(), String> {
    let counters = serving.counters;
    // A stream of groups holds a place while it lasts; `have` and `cvs`
    // (one answer each) need none.
    let mut place = None;
    // Requests one after the other, each answered whole before the next is
    // read, until the asker closes (or is quiet for a while).
    while let Some(bytes) = read_frame(handle, &mut stream, MAX_REQUEST)? {
        let req = match (serving.admitted, Request::decode(&bytes)) {
            (false, _) => Err("not admitted".to_string()),
            (true, Err(e)) => Err(e.to_string()),
            (true, Ok(r @ Request::Groups { .. })) if place.is_none() => {
                match Place::take(&counters.serving, serving.max) {
                    Some(p) => {
                        place = Some(p);
                        Ok(r)
                    }
                    None => {
                        counters.busy.fetch_add(1, Ordering::Relaxed);
                        Err(format!(
                            "{}: serving {} streams of groups; ask again later",
                            blobs::wire::BUSY,
                            serving.max
                        ))
                    }
                }
            }
            (true, Ok(r)) => Ok(r),
        };
        match req {
            Ok(r) => {
                let before = counters.served.load(Ordering::Relaxed);
                answer(handle, &mut stream, &r, store, partials, counters)?;
                let bytes = counters
                    .served
                    .load(Ordering::Relaxed)
                    .saturating_sub(before);
                if bytes > 0 {
                    tracing::debug!(bytes, "blob groups served");
                }
            }
            Err(why) => {
                write_frame(handle, &mut stream, &Answer::Refused(why).encode())?;
                break;
            }
        }
    }
    close(handle, stream)
}

/// Writes the answer to one request.
fn answer(
    handle: &tokio::runtime::Handle,
    stream: &mut mesh::Stream,
    req: &Request,
    store: &BlobStore,
    partials: &Mutex<HashMap<Hash, Partial>>,
    counters: &Counters,
) -> Result<(), String> {
    let answer_one = |r: &Request| match partials.lock() {
        Ok(m) => store.answer(r, m.get(&r.hash())),
        Err(_) => store.answer(r, None),
    };
    let wire = |frame: &[u8]| {
        counters.served_wire.fetch_add(
            (frame.len() + mesh::frame::HEADER) as u64,
            Ordering::Relaxed,
        );
    };
    if !matches!(req, Request::Groups { .. }) {
        let frame = answer_one(req).encode();
        wire(&frame);
        return write_frame(handle, stream, &frame);
    }
    // A whole blob: opened once, each group read straight into its frame.
    let whole = std::fs::File::open(store.path(&req.hash()))
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.len() == req.size()));
    let mut i = 0;
    // Frames of a whole blob leave in batches of up to 8 (128 KiB): fewer
    // waits on the stream. The batch's buffer is made once and filled in
    // place (no zeroing per group).
    let mut batch = Batch::default();
    while let Some(one) = req.group(i) {
        i += 1;
        if let (Some(f), Request::Groups { size, from, .. }) = (&whole, &one)
            && let Some(n) = batch.add_group(f, *size, *from)
        {
            counters.served_wire.fetch_add(
                (n + mesh::frame::HEADER + GROUP_HEADER) as u64,
                Ordering::Relaxed,
            );
            counters.served.fetch_add(n as u64, Ordering::Relaxed);
            if batch.is_full() {
                write_raw(handle, stream, batch.take())?;
            }
            continue;
        }
        if !batch.is_empty() {
            write_raw(handle, stream, batch.take())?;
        }
        let answer = answer_one(&one);
        let stop = !matches!(answer, Answer::Groups { .. });
        let frame = answer.encode();
        wire(&frame);
        write_frame(handle, stream, &frame)?;
        if let Answer::Groups { data, .. } = &answer {
            counters
                .served
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        if stop {
            break;
        }
    }
    if !batch.is_empty() {
        write_raw(handle, stream, batch.take())?;
    }
    Ok(())
}

/// Whole frames of groups of a whole blob (the mesh's length header, the
/// answer's header, the group), read from the file straight into place.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    used: usize,
}

/// Groups in a [`Batch`].
const BATCH_GROUPS: usize = 8;

impl Batch {
    const FRAME: usize = mesh::frame::HEADER + GROUP_HEADER + blobs::GROUP as usize;

    /// Appends the frame of group `g` of a blob of `size` bytes read from
    /// `f`. Returns the group's length; `None` (and the batch as it was)
    /// if it could not be read.
    fn add_group(&mut self, f: &std::fs::File, size: u64, g: u64) -> Option<usize> {
        use std::os::unix::fs::FileExt;
        if self.buf.is_empty() {
            self.buf = vec![0; BATCH_GROUPS * Self::FRAME];
        }
        let r = blobs::tree::group_range(size, g);
        let len = (r.end - r.start) as usize;
        let out = self.buf.get_mut(self.used..self.used + Self::FRAME)?;
        let (head, rest) = out.split_at_mut(mesh::frame::HEADER + GROUP_HEADER);
        head[..mesh::frame::HEADER].copy_from_slice(&((GROUP_HEADER + len) as u32).to_be_bytes());
        head[mesh::frame::HEADER..].copy_from_slice(&group_header(g));
        f.read_exact_at(rest.get_mut(..len)?, r.start).ok()?;
        self.used += mesh::frame::HEADER + GROUP_HEADER + len;
        Some(len)
    }

    /// Whether another group might not fit.
    fn is_full(&self) -> bool {
        self.buf.len() - self.used < Self::FRAME
    }

    fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// The frames held, emptying the batch (its buffer stays).
    fn take(&mut self) -> &[u8] {
        let n = std::mem::take(&mut self.used);
        &self.buf[..n]
    }
}

/// Writes bytes that are already a frame (header included).
fn write_raw(
    handle: &tokio::runtime::Handle,
    stream: &mut mesh::Stream,
    bytes: &[u8],
) -> Result<(), String> {
    use futures::AsyncWriteExt;
    handle.block_on(async {
        let w = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        match tokio::time::timeout(FRAME_WAIT, w).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the peer took no frame for {} s",
                FRAME_WAIT.as_secs()
            )),
        }
    })
}

fn close(handle: &tokio::runtime::Handle, mut stream: mesh::Stream) -> Result<(), String> {
    handle
        .block_on(futures::AsyncWriteExt::close(&mut stream))
        .map_err(|e| e.to_string())
}
