//! Blobs in a running daemon: `/shoal/blob/1` answered from the data dir's
//! blob store, and the fetches of the blobs this daemon wants, each a
//! [`blobs::fetch::Fetch`] driven over the mesh.
//!
//! Reads and writes of blob files run on blocking threads; a fetch's
//! requests run as tasks that report back through one channel, which the
//! driver's loop reads ([`crate::driver::Input::Blob`]). Only admitted peers
//! are answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blobs::fetch::Fetch;
use blobs::wire::{Answer, MAX_ANSWER, Request};
use blobs::{BlobStore, Cvs, Hash, Partial};
use mesh::{Mesh, PeerId};
use tokio::sync::mpsc;

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
    /// Groups checked and written for a peer's answer.
    Written {
        /// The blob.
        hash: Hash,
        /// Who sent them.
        peer: PeerId,
        /// Each group: verified and written, refused (it does not verify),
        /// or not written (`None`: the partial file was not open yet, or a
        /// disk error; asked again, nobody blamed).
        groups: Vec<(u64, Option<bool>)>,
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
    tx: mpsc::UnboundedSender<Event>,
    seed: u64,
    now_ms: u64,
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
            tx,
            seed,
            now_ms: 0,
        }
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

    /// Sends what the fetches ask for, each request as a task.
    fn send(&mut self, mesh: &Mesh) {
        for (hash, f) in self.fetches.iter_mut() {
            while let Some((peer, req)) = f.poll() {
                let mesh = mesh.clone();
                let tx = self.tx.clone();
                let hash = *hash;
                tokio::spawn(async move {
                    let result = mesh
                        .ask(peer, mesh::BLOB, req.encode(), MAX_ANSWER)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Event::Answered {
                        hash,
                        peer,
                        req,
                        result,
                    });
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
                            self.begin(hash, cvs);
                        }
                        if !got.groups.is_empty() {
                            self.write(hash, peer, got.groups);
                        }
                    }
                }
            }
            Event::Written { hash, peer, groups } => {
                if let Some(f) = self.fetches.get_mut(&hash) {
                    for (g, ok) in groups {
                        match ok {
                            Some(ok) => {
                                if let Some(why) = f.group_done(peer, g, ok) {
                                    out.security.push((peer.to_string(), why));
                                }
                            }
                            None => f.not_written(peer, g),
                        }
                    }
                    if f.is_complete() {
                        self.finish(hash);
                    }
                }
            }
            Event::Finished { hash, result } => {
                self.fetches.remove(&hash);
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
            }
            Err(e) => {
                let _ = tx.send(Event::Finished {
                    hash,
                    result: Err(e.to_string()),
                });
            }
        });
    }

    /// Checks and writes groups on a blocking thread.
    fn write(&self, hash: Hash, peer: PeerId, groups: Vec<(u64, Vec<u8>)>) {
        let partials = self.partials.clone();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = partials.lock().ok();
            let partial = guard.as_mut().and_then(|m| m.get_mut(&hash));
            let results = match partial {
                Some(p) => groups
                    .iter()
                    .map(|(g, bytes)| {
                        let r = match p.write_group(*g, bytes) {
                            Ok(()) => Some(true),
                            Err(blobs::store::Error::Mismatch { .. }) => Some(false),
                            Err(e) => {
                                tracing::warn!(blob = %hash.short(), error = %e, "group not written");
                                None
                            }
                        };
                        (*g, r)
                    })
                    .collect(),
                // Not begun yet: asked again, nobody blamed.
                None => groups.iter().map(|(g, _)| (*g, None)).collect(),
            };
            drop(guard);
            let _ = tx.send(Event::Written {
                hash,
                peer,
                groups: results,
            });
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

    /// Answers a peer's request (admitted or not: `admitted` says) on a
    /// blocking thread.
    pub fn serve(
        &self,
        admitted: bool,
        bytes: &[u8],
        reply: tokio::sync::oneshot::Sender<Vec<u8>>,
    ) {
        if !admitted {
            let _ = reply.send(Answer::Refused("not admitted".into()).encode());
            return;
        }
        let req = match Request::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(Answer::Refused(e.to_string()).encode());
                return;
            }
        };
        let store = self.store.clone();
        let partials = self.partials.clone();
        tokio::task::spawn_blocking(move || {
            let answer = match partials.lock() {
                Ok(m) => store.answer(&req, m.get(&req.hash())),
                Err(_) => store.answer(&req, None),
            };
            let _ = reply.send(answer.encode());
        });
    }
}
