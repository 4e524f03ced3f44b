//! Blobs in a running daemon: `/shoal/blob/1` answered from the data dir's
//! blob store, and the fetches of the blobs this daemon wants, each a
//! [`blobs::fetch::Fetch`] driven over the mesh.
//!
//! Every request is a stream of its own, run on a blocking thread (files
//! are read and written there, never on the loop): the asker writes the
//! request, then reads the answer frame by frame; for a run of groups it
//! checks and writes each group before it reads the next, so a transfer
//! holds one group in memory and the disk's pace reaches the sender through
//! QUIC's flow control. What each request brought is reported to the loop
//! through one channel ([`crate::driver::Input::Blob`]). Only admitted
//! peers are answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blobs::fetch::Fetch;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use blobs::wire::{Answer, MAX_ANSWER, MAX_REQUEST, Request};
use blobs::{BlobStore, Cvs, Hash, Partial};
use mesh::{Mesh, PeerId};
use tokio::sync::mpsc;

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
    /// A group of a run read, checked and written.
    Written {
        /// The blob.
        hash: Hash,
        /// Who sent it.
        peer: PeerId,
        /// The group.
        group: u64,
        /// Verified and written, refused (it does not verify), or not
        /// written (`None`: the partial file was not open, or a disk error;
        /// asked again, nobody blamed).
        ok: Option<bool>,
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
    pub security: Vec<(String, String)>,
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
    /// Blobs whose group hashes are known but whose partial file is being
    /// opened: no group is asked for until it is.
    beginning: std::collections::HashSet<Hash>,
    tx: mpsc::UnboundedSender<Event>,
    seed: u64,
    now_ms: u64,
    /// Bytes of groups sent to peers and received from them (for the
    /// figures and the metrics).
    counters: Arc<Counters>,
}

/// Bytes of groups moved, since the start.
#[derive(Debug, Default)]
pub struct Counters {
    /// Group bytes written to peers' streams.
    pub served: AtomicU64,
    /// Group bytes read from peers' streams (verified or not).
    pub received: AtomicU64,
}

impl Blobs {
    /// Blobs over `store`; events come back on `tx`. `seed` spreads the
    /// nodes of a site over a blob when they ask an anchor.
    pub fn new(store: BlobStore, tx: mpsc::UnboundedSender<Event>, seed: u64) -> Blobs {
        Blobs {
            store: Arc::new(store),
            partials: Arc::new(Mutex::new(HashMap::new())),
            fetches: HashMap::new(),
            opening: HashMap::new(),
            peers: HashMap::new(),
            refused: HashMap::new(),
            beginning: Default::default(),
            tx,
            seed,
            now_ms: 0,
            counters: Arc::default(),
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

    /// Time passes.
    pub fn tick(&mut self, mesh: &Mesh, now_ms: u64) {
        self.now_ms = now_ms;
        for f in self.fetches.values_mut() {
            f.tick(now_ms);
        }
        self.send(mesh);
    }

    /// Sends what the fetches ask for, each request on a stream of its own
    /// run by a blocking thread.
    fn send(&mut self, mesh: &Mesh) {
        for (hash, f) in self.fetches.iter_mut() {
            if self.beginning.contains(hash) {
                continue;
            }
            while let Some((peer, req)) = f.poll() {
                let mesh = mesh.clone();
                let tx = self.tx.clone();
                let partials = self.partials.clone();
                let counters = self.counters.clone();
                let handle = tokio::runtime::Handle::current();
                let hash = *hash;
                let span = tracing::debug_span!("blob_ask", %peer, blob = %hash.short());
                tokio::task::spawn_blocking(move || {
                    let _entered = span.enter();
                    ask(&handle, &mesh, peer, req, &partials, &counters, &tx);
                });
            }
        }
    }

    /// Handles what a task reported.
    pub fn on_event(&mut self, mesh: &Mesh, ev: Event) -> Outcome {
        let mut out = Outcome::default();
        match ev {
            Event::Opened { hash, result } => {
                let Some(size) = self.opening.remove(&hash) else {
                    return out;
                };
                let resumed = result.ok();
                let mut f = Fetch::new(hash, size, self.seed, resumed);
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
                            out.security.push((peer.to_string(), why));
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
            Event::Written {
                hash,
                peer,
                group,
                ok,
            } => {
                if let Some(f) = self.fetches.get_mut(&hash) {
                    match ok {
                        Some(ok) => {
                            if let Some(why) = f.group_done(peer, group, ok) {
                                out.security.push((peer.to_string(), why));
                            }
                        }
                        None => f.not_written(peer, group),
                    }
                    if f.is_complete() {
                        self.finish(hash);
                    }
                }
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
        let handle = tokio::runtime::Handle::current();
        let span = tracing::debug_span!("blob_serve", %peer);
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            if let Err(e) = serve(&handle, admitted, stream, &store, &partials, &counters) {
                tracing::debug!(error = %e, "blob stream ended early");
            }
        });
    }
}

/// Reads one frame within [`FRAME_WAIT`] (from a blocking thread).
fn read_frame(
    handle: &tokio::runtime::Handle,
    stream: &mut mesh::Stream,
    max: usize,
) -> Result<Option<Vec<u8>>, String> {
    handle.block_on(async {
        match tokio::time::timeout(FRAME_WAIT, mesh::frame::read(stream, max)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no frame within {} s", FRAME_WAIT.as_secs())),
        }
    })
}

/// Writes one frame within [`FRAME_WAIT`] (from a blocking thread).
fn write_frame(
    handle: &tokio::runtime::Handle,
    stream: &mut mesh::Stream,
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

/// Asks `peer` one request of a fetch and reports what came back.
fn ask(
    handle: &tokio::runtime::Handle,
    mesh: &Mesh,
    peer: PeerId,
    req: Request,
    partials: &Mutex<HashMap<Hash, Partial>>,
    counters: &Counters,
    tx: &mpsc::UnboundedSender<Event>,
) {
    let hash = req.hash();
    let opened = handle
        .block_on(mesh.open(peer, mesh::BLOB))
        .map_err(|e| e.to_string())
        .and_then(|mut s| write_frame(handle, &mut s, &req.encode()).map(|()| s));
    let mut stream = match opened {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(match req {
                Request::Groups { .. } => Event::Ended {
                    hash,
                    peer,
                    req,
                    error: Some(e),
                },
                _ => Event::Answered {
                    hash,
                    peer,
                    req,
                    result: Err(e),
                },
            });
            return;
        }
    };
    if !matches!(req, Request::Groups { .. }) {
        let result = read_frame(handle, &mut stream, MAX_ANSWER).and_then(|f| {
            f.ok_or_else(|| "the peer closed the stream without an answer".to_string())
        });
        let _ = tx.send(Event::Answered {
            hash,
            peer,
            req,
            result,
        });
        return;
    }
    let mut i = 0;
    let error = loop {
        let Some(one) = req.group(i) else {
            break None;
        };
        i += 1;
        let frame = match read_frame(handle, &mut stream, MAX_ANSWER) {
            Ok(Some(f)) => f,
            Ok(None) => break None,
            Err(e) => break Some(e),
        };
        match Answer::decode(&one, &frame) {
            Ok(Answer::Groups { from, data, .. }) => {
                counters
                    .received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                tracing::debug!(group = from, bytes = data.len(), "blob group received");
                let ok = write_group(partials, &hash, from, &data);
                let _ = tx.send(Event::Written {
                    hash,
                    peer,
                    group: from,
                    ok,
                });
                if ok == Some(false) {
                    // A peer that lied is read no further.
                    break None;
                }
            }
            Ok(refused) => {
                // Told why it stops: the fetch forgets what it said it held.
                let _ = tx.send(Event::Answered {
                    hash,
                    peer,
                    req: req.clone(),
                    result: Ok(refused.encode()),
                });
                break None;
            }
            Err(e) => break Some(e.to_string()),
        }
    };
    let _ = tx.send(Event::Ended {
        hash,
        peer,
        req,
        error,
    });
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

/// Answers one stream: a request, then its frames.
fn serve(
    handle: &tokio::runtime::Handle,
    admitted: bool,
    mut stream: mesh::Stream,
    store: &BlobStore,
    partials: &Mutex<HashMap<Hash, Partial>>,
    counters: &Counters,
) -> Result<(), String> {
    let bytes =
        read_frame(handle, &mut stream, MAX_REQUEST)?.ok_or_else(|| "no request".to_string())?;
    let req = match (admitted, Request::decode(&bytes)) {
        (false, _) => Err("not admitted".to_string()),
        (true, Err(e)) => Err(e.to_string()),
        (true, Ok(r)) => Ok(r),
    };
    let req = match req {
        Ok(r) => r,
        Err(why) => {
            write_frame(handle, &mut stream, &Answer::Refused(why).encode())?;
            return close(handle, stream);
        }
    };
    let answer_one = |r: &Request| match partials.lock() {
        Ok(m) => store.answer(r, m.get(&r.hash())),
        Err(_) => store.answer(r, None),
    };
    if !matches!(req, Request::Groups { .. }) {
        write_frame(handle, &mut stream, &answer_one(&req).encode())?;
        return close(handle, stream);
    }
    let mut i = 0;
    while let Some(one) = req.group(i) {
        i += 1;
        let answer = answer_one(&one);
        let stop = !matches!(answer, Answer::Groups { .. });
        let frame = answer.encode();
        write_frame(handle, &mut stream, &frame)?;
        if stop {
            break;
        }
        counters
            .served
            .fetch_add(frame.len().saturating_sub(13) as u64, Ordering::Relaxed);
    }
    close(handle, stream)
}

fn close(handle: &tokio::runtime::Handle, mut stream: mesh::Stream) -> Result<(), String> {
    handle
        .block_on(futures::AsyncWriteExt::close(&mut stream))
        .map_err(|e| e.to_string())
}
