//! Which groups of a blob to ask of which peer: the fetch of one blob,
//! sans-IO.
//!
//! The driver tells a [`Fetch`] which peers are connected (and which of
//! them are anchors), sends the requests it polls ([`Fetch::poll`]), and
//! hands it what comes back: a `have` or `cvs` answer ([`Fetch::answer`]);
//! for a `groups` request, the outcome of each group as it was read,
//! checked and written through [`crate::Partial::write_group`]
//! ([`Fetch::group_done`], [`Fetch::not_written`]), then the end of the
//! stream ([`Fetch::ended`]) or its failure ([`Fetch::failed`]).
//!
//! - Every peer is asked what it holds (`have`), neighbours again every
//!   [`HAVE_EVERY_MS`] while the fetch runs, since they are fetching too.
//! - The group hashes come from one peer that holds any of the blob, and
//!   are checked against the blob's hash before any group is asked for; a
//!   peer whose list does not add up is not asked again.
//! - Groups go to neighbours (peers that are not anchors) first: a group a
//!   neighbour holds is never asked of an anchor. Of an anchor, a node asks
//!   only for the units of [`ANCHOR_GROUPS`] groups it owns by rendezvous
//!   among itself and the neighbours that are fetching too, so the nodes of
//!   a site ask the anchor for disjoint parts and pass them along (ADR 0009
//!   point 6).
//! - One `groups` request at a time per peer ([`IN_FLIGHT`]), each a run of
//!   at most [`MAX_GROUPS`] groups (4 MiB) streamed one group per frame: a
//!   transfer holds one group per source in memory, and a receiver killed
//!   at any moment has read at most one group per source that it did not
//!   write.
//! - A peer that sends a group that does not verify is banned from this
//!   fetch ([`Fetch::group_done`] says so, for the security log) and what
//!   it was asked for goes to others.

use std::collections::{BTreeMap, VecDeque};

use crate::store::Hash;
use crate::tree::{Cvs, groups};
use crate::wire::{Answer, MAX_CVS, MAX_GROUPS, Request};

/// `groups` requests in flight to one peer.
pub const IN_FLIGHT: u32 = 2;
/// Most groups asked of an anchor at once (256 KiB) while neighbours fetch
/// the same blob, and the unit in which the nodes of a site share out what
/// they ask of the anchor.
pub const ANCHOR_GROUPS: u32 = 16;
/// A neighbour whose holdings have not grown for this long is left out of
/// the sharing (it does not fetch this blob, or it is stuck).
pub const STALL_MS: u64 = 3000;
/// A fetch that has received nothing for this long asks an anchor for any
/// group no neighbour holds, whoever's share it is (the nodes of a site may
/// disagree on who is fetching when they do not all see each other).
pub const STARVED_MS: u64 = 1500;
/// How often a neighbour is asked again what it holds.
pub const HAVE_EVERY_MS: u64 = 250;
/// How long a peer that said it was busy is left alone, at least: each
/// fetch waits between this and twice this (spread by its key, so that the
/// nodes an anchor turned away do not all come back at once).
pub const BUSY_MS: u64 = 5000;

#[derive(Debug, Default)]
struct Peer {
    anchor: bool,
    /// Runs of groups it holds, as it last said.
    runs: Vec<(u64, u64)>,
    /// When it was last asked what it holds (a `have` in flight: `asking`).
    asked_ms: Option<u64>,
    asking: bool,
    /// Its last answer about what it holds failed or was refused (it had
    /// not admitted us yet, or it holds less than it said): asked again
    /// after [`HAVE_EVERY_MS`], an anchor too.
    ask_again: bool,
    /// Its key for the rendezvous of the groups an anchor is asked for.
    key: u64,
    /// Groups it held at its last answer, and when that last grew (or it
    /// came): a neighbour that has not grown for [`STALL_MS`] does not
    /// fetch this blob (or is stuck), and its share goes to the others.
    held_total: u64,
    grew_ms: u64,
    in_flight: u32,
    banned: bool,
    /// It refused a stream because it serves as many as it will
    /// ([`crate::wire::BUSY`]): not asked anything before this time.
    busy_until: u64,
}

impl Peer {
    fn holds(&self, g: u64) -> bool {
        // Runs are ascending and disjoint.
        let i = self.runs.partition_point(|(s, l)| s + l <= g);
        self.runs.get(i).is_some_and(|(s, _)| *s <= g)
    }

    fn holds_any(&self) -> bool {
        !self.runs.is_empty()
    }
}

/// What an answer brought.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// The group hashes are complete and verified: begin the partial blob
    /// with them.
    pub cvs: Option<Cvs>,
    /// A peer to report (its list of hashes did not add up).
    pub misbehaved: Option<String>,
}

/// The fetch of one blob from the peers at hand.
#[derive(Debug)]
pub struct Fetch<P: Copy + Ord + std::fmt::Debug + std::hash::Hash> {
    hash: Hash,
    size: u64,
    n: u64,
    seed: u64,
    cvs: Option<Cvs>,
    /// The list being fetched, and from whom.
    cv_buf: Vec<[u8; 32]>,
    cv_from: Option<P>,
    cv_asked: bool,
    held: Vec<bool>,
    /// How many of `held` are true (a fetch asks "complete?" per group).
    held_count: u64,
    /// Groups asked for, and of whom.
    pending: BTreeMap<u64, P>,
    peers: BTreeMap<P, Peer>,
    out: VecDeque<(P, Request)>,
    now_ms: u64,
    /// When a group last arrived (or the fetch began).
    progress_ms: u64,
    /// Groups known held from where runs are looked for (an anchor's
    /// starting point, and 0 for neighbours): the search starts past them,
    /// so finding the next run does not rescan what is held.
    skip: [u64; 2],
}

/// A peer's key: FNV-1a over its `Hash`, the same on every node of every
/// version (std's hasher is not promised to be).
fn key_of<P: std::hash::Hash>(p: &P) -> u64 {
    struct Fnv(u64);
    impl std::hash::Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= u64::from(*b);
                self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    p.hash(&mut h);
    std::hash::Hasher::finish(&h)
}

/// SplitMix64's finaliser: a well-spread score from a key and a unit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl<P: Copy + Ord + std::fmt::Debug + std::hash::Hash> Fetch<P> {
    /// A fetch of `hash` (`size` bytes) by peer `me`. `resumed`: what a
    /// partial blob already holds, with its list.
    pub fn new(hash: Hash, size: u64, me: P, resumed: Option<(Cvs, Vec<bool>)>) -> Fetch<P> {
        let seed = key_of(&me);
        let n = groups(size);
        let (cvs, held) = match resumed {
            Some((c, h)) if h.len() as u64 == n => (Some(c), h),
            _ => (None, vec![false; n as usize]),
        };
        // One group needs no list: it is checked whole against the hash.
        let cvs = match cvs {
            None if n == 1 => Cvs::verify(hash.0, size, Vec::new()).ok(),
            other => other,
        };
        Fetch {
            hash,
            size,
            n,
            seed,
            cvs,
            cv_buf: Vec::new(),
            cv_from: None,
            cv_asked: false,
            held_count: held.iter().filter(|h| **h).count() as u64,
            held,
            pending: BTreeMap::new(),
            peers: BTreeMap::new(),
            out: VecDeque::new(),
            now_ms: 0,
            progress_ms: 0,
            skip: [0; 2],
        }
    }

    /// The blob.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// Its size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes held (the last group may be short).
    pub fn held_bytes(&self) -> u64 {
        let full = self.held_count * crate::tree::GROUP;
        match self.n.checked_sub(1) {
            Some(last) if self.has(last) => {
                let r = crate::tree::group_range(self.size, last);
                full - (crate::tree::GROUP - (r.end - r.start))
            }
            _ => full,
        }
        .min(self.size)
    }

    /// The verified group hashes, once known.
    pub fn cvs(&self) -> Option<&Cvs> {
        self.cvs.as_ref()
    }

    /// Every group held.
    pub fn is_complete(&self) -> bool {
        self.held_count == self.n
    }

    /// Groups held.
    pub fn held(&self) -> u64 {
        self.held_count
    }

    /// Whether group `g` is held.
    pub fn has(&self, g: u64) -> bool {
        self.held.get(g as usize).copied().unwrap_or(false)
    }

    /// Runs of held groups, for answering a peer's `have`.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        runs_of(&self.held)
    }

    /// A peer is connected.
    pub fn peer_up(&mut self, now_ms: u64, p: P, anchor: bool) {
        self.now_ms = now_ms;
        if self.progress_ms == 0 {
            self.progress_ms = now_ms;
        }
        self.peers.entry(p).or_insert_with(|| Peer {
            anchor,
            key: key_of(&p),
            grew_ms: now_ms,
            ..Peer::default()
        });
        self.plan();
    }

    /// A peer is gone: what it was asked for goes to others.
    pub fn peer_down(&mut self, p: P) {
        self.peers.remove(&p);
        self.pending.retain(|_, q| *q != p);
        if self.cv_from == Some(p) {
            self.cv_from = None;
            self.cv_asked = false;
            self.cv_buf.clear();
        }
        self.out.retain(|(q, _)| *q != p);
        self.plan();
    }

    /// The time now, for what follows (without planning anything).
    pub fn at(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Time passes: neighbours are asked again what they hold.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.plan();
    }

    /// The next request to send.
    pub fn poll(&mut self) -> Option<(P, Request)> {
        self.out.pop_front()
    }

    /// A request failed (no answer, a broken stream): asked again elsewhere.
    pub fn failed(&mut self, p: P, req: &Request) {
        self.settle(p, req);
        self.unpend(p, req);
        if let (Request::Have { .. }, Some(peer)) = (req, self.peers.get_mut(&p)) {
            peer.ask_again = true;
        }
        if let Request::Cvs { .. } = req {
            self.cv_asked = false;
        }
        self.plan();
    }

    /// The stream of a `groups` request ended: what it did not bring (the
    /// holder stopped early) is asked for again.
    pub fn ended(&mut self, p: P, req: &Request) {
        self.settle(p, req);
        self.unpend(p, req);
        self.plan();
    }

    fn settle(&mut self, p: P, req: &Request) {
        if let Some(peer) = self.peers.get_mut(&p) {
            match req {
                Request::Have { .. } => peer.asking = false,
                _ => peer.in_flight = peer.in_flight.saturating_sub(1),
            }
        }
    }

    /// Groups of `req` asked of `p` are no longer waited for.
    fn unpend(&mut self, p: P, req: &Request) {
        if let Request::Groups { from, count, .. } = req {
            for g in *from..from + u64::from(*count) {
                if self.pending.get(&g) == Some(&p) {
                    self.pending.remove(&g);
                }
            }
        }
    }

    /// An answer from `p` to `req` (already decoded against `req`).
    pub fn answer(&mut self, now_ms: u64, p: P, req: &Request, answer: Answer) -> Received {
        self.now_ms = now_ms;
        self.settle(p, req);
        let mut got = Received::default();
        match (req, answer) {
            (Request::Have { .. }, Answer::Have(runs)) => {
                if let Some(peer) = self.peers.get_mut(&p) {
                    let total: u64 = runs.iter().map(|(_, l)| l).sum();
                    if total > peer.held_total {
                        peer.grew_ms = now_ms;
                    }
                    peer.held_total = total;
                    peer.runs = runs;
                    peer.ask_again = false;
                }
            }
            (_, Answer::Refused(why)) => {
                self.unpend(p, req);
                // It holds less than it said (or has not admitted us yet,
                // or serves as many streams as it will): forget what it
                // said, ask again in a while.
                let seed = self.seed;
                if let Some(peer) = self.peers.get_mut(&p) {
                    peer.runs.clear();
                    peer.ask_again = true;
                    if why.starts_with(crate::wire::BUSY) {
                        peer.busy_until = now_ms + BUSY_MS + mix(seed ^ peer.key) % BUSY_MS;
                    }
                }
                if matches!(req, Request::Cvs { .. }) {
                    self.cv_asked = false;
                    self.cv_from = None;
                    self.cv_buf.clear();
                }
            }
            (Request::Cvs { from, .. }, Answer::Cvs(values)) => {
                self.cv_asked = false;
                if self.cv_from == Some(p) && *from == self.cv_buf.len() as u64 {
                    self.cv_buf.extend(values);
                }
                if self.cv_buf.len() as u64 == self.n {
                    let list = std::mem::take(&mut self.cv_buf);
                    match Cvs::verify(self.hash.0, self.size, list) {
                        Ok(c) => {
                            self.cvs = Some(c.clone());
                            got.cvs = Some(c);
                        }
                        Err(e) => {
                            self.ban(p);
                            got.misbehaved = Some(format!(
                                "sent group hashes of blob {}: {e}",
                                self.hash.short()
                            ));
                        }
                    }
                    self.cv_from = None;
                }
            }
            // Groups come one by one (`group_done`), not as an answer.
            _ => {}
        }
        self.plan();
        got
    }

    /// The outcome of checking a group `p` sent: a bad one bans `p` from
    /// this fetch; returns the words for the security log then (once per
    /// peer).
    pub fn group_done(&mut self, p: P, g: u64, ok: bool) -> Option<String> {
        // Groups stay asked for until checked, so no other peer is asked
        // for them meanwhile.
        if self.pending.get(&g) == Some(&p) {
            self.pending.remove(&g);
        }
        let mut bad = None;
        if ok {
            if let Some(h) = self.held.get_mut(g as usize)
                && !*h
            {
                *h = true;
                self.held_count += 1;
                self.progress_ms = self.now_ms;
            }
        } else if !self.peers.get(&p).is_some_and(|q| q.banned) {
            self.ban(p);
            bad = Some(format!(
                "sent group {g} of blob {} that does not match its hash",
                self.hash.short()
            ));
        }
        self.plan();
        bad
    }

    /// A group `p` sent was not written here (the disk, or the partial
    /// file not open yet): asked again, `p` not blamed.
    pub fn not_written(&mut self, p: P, g: u64) {
        if self.pending.get(&g) == Some(&p) {
            self.pending.remove(&g);
        }
        self.plan();
    }

    fn ban(&mut self, p: P) {
        if let Some(peer) = self.peers.get_mut(&p) {
            peer.banned = true;
            peer.runs.clear();
        }
        self.pending.retain(|_, q| *q != p);
        if self.cv_from == Some(p) {
            self.cv_from = None;
            self.cv_asked = false;
            self.cv_buf.clear();
        }
    }

    /// Queues what may be asked now.
    fn plan(&mut self) {
        if self.is_complete() {
            return;
        }
        let now = self.now_ms;
        let hash = self.hash;
        let size = self.size;
        // What each peer holds: asked once, neighbours again every second.
        for (p, peer) in self.peers.iter_mut() {
            if peer.banned || peer.asking || now < peer.busy_until {
                continue;
            }
            let due = match peer.asked_ms {
                None => true,
                Some(t) => {
                    (!peer.anchor || peer.ask_again) && now.saturating_sub(t) >= HAVE_EVERY_MS
                }
            };
            if due {
                peer.asking = true;
                peer.asked_ms = Some(now);
                self.out.push_back((*p, Request::Have { hash, size }));
            }
        }
        if self.cvs.is_none() {
            self.plan_cvs();
            return;
        }
        self.plan_groups();
    }

    fn plan_cvs(&mut self) {
        if self.cv_asked {
            return;
        }
        if self.cv_from.is_none() {
            // Neighbours first, then anchors.
            let pick = self
                .peers
                .iter()
                .filter(|(_, q)| !q.banned && q.holds_any())
                .min_by_key(|(_, q)| q.anchor)
                .map(|(p, _)| *p);
            self.cv_from = pick;
            self.cv_buf.clear();
        }
        let Some(p) = self.cv_from else { return };
        let from = self.cv_buf.len() as u64;
        let count = (self.n - from).min(u64::from(MAX_CVS)) as u32;
        self.cv_asked = true;
        if let Some(peer) = self.peers.get_mut(&p) {
            peer.in_flight += 1;
        }
        self.out.push_back((
            p,
            Request::Cvs {
                hash: self.hash,
                size: self.size,
                from,
                count,
            },
        ));
    }

    fn plan_groups(&mut self) {
        for (k, start) in [self.seed % self.n.max(1), 0].into_iter().enumerate() {
            while self.skip[k] < self.n && self.held[((start + self.skip[k]) % self.n) as usize] {
                self.skip[k] += 1;
            }
        }
        let order: Vec<P> = {
            let mut ps: Vec<(&P, &Peer)> = self.peers.iter().filter(|(_, q)| !q.banned).collect();
            ps.sort_by_key(|(_, q)| q.anchor);
            ps.into_iter().map(|(p, _)| *p).collect()
        };
        for p in order {
            while let Some(peer) = self.peers.get(&p) {
                if peer.in_flight >= IN_FLIGHT {
                    break;
                }
                let Some((from, count)) = self.next_run(p) else {
                    break;
                };
                for g in from..from + u64::from(count) {
                    self.pending.insert(g, p);
                }
                if let Some(peer) = self.peers.get_mut(&p) {
                    peer.in_flight += 1;
                }
                self.out.push_back((
                    p,
                    Request::Groups {
                        hash: self.hash,
                        size: self.size,
                        from,
                        count,
                    },
                ));
            }
        }
    }

    /// The next run of groups to ask of `p`: missing, not asked yet, held
    /// by `p`; of an anchor only groups no usable neighbour holds, from this
    /// node's own starting point.
    fn next_run(&self, p: P) -> Option<(u64, u32)> {
        let peer = self.peers.get(&p)?;
        let neighbour_has = |g: u64| {
            self.peers
                .iter()
                .any(|(q, o)| *q != p && !o.anchor && !o.banned && o.holds(g))
        };
        // Of an anchor, a node asks only for the units it owns among the
        // neighbours fetching too (rendezvous: the same answer on every
        // node), unless it has starved.
        let starved = self.now_ms.saturating_sub(self.progress_ms) >= STARVED_MS;
        let fetching: Vec<u64> = self
            .peers
            .values()
            .filter(|q| !q.anchor && !q.banned && self.now_ms.saturating_sub(q.grew_ms) < STALL_MS)
            .map(|q| q.key)
            .collect();
        let salt = u64::from_le_bytes(self.hash.0[..8].try_into().unwrap_or([0; 8]));
        let owns = |g: u64| {
            let unit = g / u64::from(ANCHOR_GROUPS);
            let score = |k: u64| mix(k ^ mix(unit ^ salt));
            let mine = score(self.seed);
            fetching.iter().all(|k| score(*k) < mine)
        };
        let wanted = |g: u64| {
            !self.held[g as usize]
                && !self.pending.contains_key(&g)
                && peer.holds(g)
                && (!peer.anchor || (!neighbour_has(g) && (starved || owns(g))))
        };
        let (start, skip) = if peer.anchor {
            (self.seed % self.n, self.skip[0])
        } else {
            (0, self.skip[1])
        };
        let first = (skip..self.n)
            .map(|i| (start + i) % self.n)
            .find(|g| wanted(*g))?;
        // A node fetching alone owns every unit: its runs of the anchor are
        // as long as any (fewer requests, no bubbles between them).
        let most = if peer.anchor && !fetching.is_empty() {
            ANCHOR_GROUPS
        } else {
            MAX_GROUPS
        };
        let mut count = 1u32;
        while count < most {
            let g = first + u64::from(count);
            if g >= self.n || !wanted(g) {
                break;
            }
            count += 1;
        }
        Some((first, count))
    }
}

/// Runs of `true` in `held`: (start, length), ascending.
pub fn runs_of(held: &[bool]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, h) in held.iter().enumerate() {
        if !*h {
            continue;
        }
        match out.last_mut() {
            Some((s, l)) if *s + *l == i as u64 => *l += 1,
            _ => out.push((i as u64, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bytes as bytes;
    use crate::tree::GROUP;
    use crate::tree::group_range;

    /// A peer as the network sees it: what it holds of the blob, and
    /// whether it lies.
    struct Holder {
        data: Vec<u8>,
        cvs: Cvs,
        held: Vec<bool>,
        corrupt: bool,
    }

    impl Holder {
        fn serve(&self, req: &Request) -> Answer {
            match req {
                Request::Have { .. } => Answer::Have(runs_of(&self.held)),
                Request::Cvs { from, count, .. } => {
                    if !self.held.iter().any(|h| *h) {
                        return Answer::Refused("not held".into());
                    }
                    let (a, b) = (*from as usize, (*from + u64::from(*count)) as usize);
                    Answer::Cvs(self.cvs.values()[a..b].to_vec())
                }
                Request::Groups {
                    size, from, count, ..
                } => {
                    let last = from + u64::from(*count) - 1;
                    if (*from..=last).any(|g| !self.held[g as usize]) {
                        return Answer::Refused("not held".into());
                    }
                    let r = group_range(*size, *from).start..group_range(*size, last).end;
                    let mut data = self.data[r.start as usize..r.end as usize].to_vec();
                    if self.corrupt {
                        data[0] ^= 0xff;
                    }
                    Answer::Groups {
                        from: *from,
                        count: *count,
                        data,
                    }
                }
            }
        }
    }

    /// One request and what comes back, as the driver does it: a `groups`
    /// request is answered one group per frame, each checked before the
    /// next; a refusal ends the stream. Returns the groups read (and
    /// whether each verified) and the security events.
    fn exchange(
        f: &mut Fetch<usize>,
        now: u64,
        holder: &Holder,
        p: usize,
        req: &Request,
    ) -> (Vec<(u64, bool)>, Vec<String>) {
        let mut groups = Vec::new();
        let mut security = Vec::new();
        if !matches!(req, Request::Groups { .. }) {
            let got = f.answer(now, p, req, holder.serve(req));
            security.extend(got.misbehaved);
            return (groups, security);
        }
        let mut i = 0;
        while let Some(one) = req.group(i) {
            i += 1;
            match holder.serve(&one) {
                Answer::Groups { from, data, .. } => {
                    let ok = f.cvs().is_some_and(|c| c.check_group(from, &data).is_ok());
                    groups.push((from, ok));
                    security.extend(f.group_done(p, from, ok));
                    if !ok {
                        // The driver stops reading a peer that lied.
                        break;
                    }
                }
                other => {
                    security.extend(f.answer(now, p, req, other).misbehaved);
                    return (groups, security);
                }
            }
        }
        f.ended(p, req);
        (groups, security)
    }

    /// Runs fetches to completion over in-memory peers; each node serves
    /// what it holds so far. Returns groups served per peer.
    fn run(
        nodes: &mut [(Fetch<usize>, usize)],
        holders: &mut BTreeMap<usize, Holder>,
        data: &[u8],
    ) -> (BTreeMap<usize, u64>, Vec<String>) {
        let mut served: BTreeMap<usize, u64> = BTreeMap::new();
        let mut security = Vec::new();
        let mut now = 0;
        for _ in 0..100_000 {
            if nodes.iter().all(|(f, _)| f.is_complete()) {
                break;
            }
            now += 10;
            let mut progressed = false;
            for (f, me) in nodes.iter_mut() {
                f.tick(now);
                while let Some((p, req)) = f.poll() {
                    progressed = true;
                    let (groups, bad) = exchange(f, now, &holders[&p], p, &req);
                    if !groups.is_empty() {
                        *served.entry(p).or_default() += groups.len() as u64;
                    }
                    if let Some(c) = f.cvs() {
                        assert_eq!(c.hash(), *blake3::hash(data).as_bytes());
                    }
                    security.extend(bad);
                    if let Some(h) = holders.get_mut(me) {
                        for (g, ok) in groups {
                            if ok {
                                h.held[g as usize] = true;
                            }
                        }
                    }
                }
            }
            if !progressed {
                now += HAVE_EVERY_MS;
            }
        }
        (served, security)
    }

    fn holder(data: &[u8], all: bool, corrupt: bool) -> Holder {
        let cvs = Cvs::of(data);
        let n = cvs.groups() as usize;
        Holder {
            data: data.to_vec(),
            cvs,
            held: vec![all; n],
            corrupt,
        }
    }

    const ANCHOR: usize = 0;

    #[test]
    fn one_node_fetches_everything_from_the_anchor_in_bounded_requests() {
        let data = bytes(200 * GROUP as usize + 10, 1);
        let hash = Hash::of(&data);
        let mut holders = BTreeMap::from([
            (ANCHOR, holder(&data, true, false)),
            (1, holder(&data, false, false)),
        ]);
        let mut f = Fetch::new(hash, data.len() as u64, 1, None);
        f.peer_up(0, ANCHOR, true);
        let mut nodes = vec![(f, 1)];
        let (served, security) = run(&mut nodes, &mut holders, &data);
        assert!(nodes[0].0.is_complete());
        assert_eq!(served[&ANCHOR], 201, "every group once");
        assert!(security.is_empty());
    }

    /// An anchor that refuses at first (it has not admitted this node yet)
    /// is asked again a while later, not given up on.
    #[test]
    fn an_anchor_that_refused_is_asked_again() {
        let data = bytes(3 * GROUP as usize, 8);
        let hash = Hash::of(&data);
        let anchor = holder(&data, true, false);
        let mut f: Fetch<usize> = Fetch::new(hash, data.len() as u64, 1, None);
        f.peer_up(0, ANCHOR, true);
        let (p, req) = f.poll().expect("a have");
        f.answer(0, p, &req, Answer::Refused("not admitted".into()));
        f.tick(HAVE_EVERY_MS / 2);
        assert_eq!(f.poll(), None, "not at once");
        f.tick(HAVE_EVERY_MS);
        let (p, req) = f.poll().expect("asked again a while later");
        assert_eq!(p, ANCHOR);
        assert!(matches!(req, Request::Have { .. }));
        // A failed stream likewise.
        f.failed(p, &req);
        f.tick(2 * HAVE_EVERY_MS);
        let (p, req) = f.poll().expect("asked again");
        let mut now = 2 * HAVE_EVERY_MS;
        exchange(&mut f, now, &anchor, p, &req);
        for _ in 0..100 {
            now += 10;
            f.tick(now);
            while let Some((p, req)) = f.poll() {
                exchange(&mut f, now, &anchor, p, &req);
            }
        }
        assert!(f.is_complete(), "fetched from the anchor in the end");
    }

    /// An anchor that turned a stream away as busy is left alone for
    /// between [`BUSY_MS`] and twice that (by the node's key: two nodes
    /// come back at different times), then asked again and fetched from.
    #[test]
    fn an_anchor_that_was_busy_is_left_alone_for_a_while() {
        let data = bytes(3 * GROUP as usize, 9);
        let hash = Hash::of(&data);
        let anchor = holder(&data, true, false);
        let back_after = |me: usize| {
            let mut f: Fetch<usize> = Fetch::new(hash, data.len() as u64, me, None);
            f.peer_up(0, ANCHOR, true);
            let (p, req) = f.poll().expect("a have");
            f.answer(
                0,
                p,
                &req,
                Answer::Refused(format!("{}: 128 streams", crate::wire::BUSY)),
            );
            let mut now = 0;
            loop {
                now += 50;
                f.tick(now);
                if let Some((p, req)) = f.poll() {
                    assert!(
                        (BUSY_MS..2 * BUSY_MS + 50).contains(&now),
                        "asked again at {now}"
                    );
                    let mut t = now;
                    exchange(&mut f, t, &anchor, p, &req);
                    for _ in 0..100 {
                        t += 10;
                        f.tick(t);
                        while let Some((p, req)) = f.poll() {
                            exchange(&mut f, t, &anchor, p, &req);
                        }
                    }
                    assert!(f.is_complete(), "fetched after the wait");
                    return now;
                }
                assert!(now < 3 * BUSY_MS, "never asked again");
            }
        };
        let times: std::collections::BTreeSet<u64> = (1..6).map(back_after).collect();
        assert!(times.len() > 1, "five nodes came back at once: {times:?}");
    }

    #[test]
    fn a_neighbour_is_asked_before_the_anchor() {
        let data = bytes(100 * GROUP as usize, 2);
        let hash = Hash::of(&data);
        let mut holders = BTreeMap::from([
            (ANCHOR, holder(&data, true, false)),
            (1, holder(&data, false, false)),
            (2, holder(&data, true, false)),
        ]);
        let mut f = Fetch::new(hash, data.len() as u64, 1, None);
        f.peer_up(0, ANCHOR, true);
        f.peer_up(0, 2, false);
        let mut nodes = vec![(f, 1)];
        let (served, _) = run(&mut nodes, &mut holders, &data);
        assert!(nodes[0].0.is_complete());
        assert_eq!(served.get(&ANCHOR), None, "{served:?}");
        assert_eq!(served[&2], 100);
    }

    #[test]
    fn a_lying_neighbour_is_banned_and_the_anchor_serves_the_rest() {
        let data = bytes(50 * GROUP as usize + 3, 3);
        let hash = Hash::of(&data);
        let mut holders = BTreeMap::from([
            (ANCHOR, holder(&data, true, false)),
            (1, holder(&data, false, false)),
            (2, holder(&data, true, true)),
        ]);
        let mut f = Fetch::new(hash, data.len() as u64, 1, None);
        f.peer_up(0, ANCHOR, true);
        f.peer_up(0, 2, false);
        let mut nodes = vec![(f, 1)];
        let (served, security) = run(&mut nodes, &mut holders, &data);
        assert!(nodes[0].0.is_complete());
        assert_eq!(security.len(), 1, "{security:?}");
        assert!(
            security[0].contains("does not match its hash"),
            "{security:?}"
        );
        assert_eq!(served[&ANCHOR], 51, "{served:?}");
    }

    #[test]
    fn a_forged_list_of_hashes_is_refused_and_fetched_elsewhere() {
        let data = bytes(20 * GROUP as usize, 4);
        let hash = Hash::of(&data);
        // Neighbour 2 holds the blob but sends a forged list of hashes.
        let honest = holder(&data, true, false);
        let mut forged = honest.cvs.values().to_vec();
        forged[3][0] ^= 1;
        let mut f: Fetch<usize> = Fetch::new(hash, data.len() as u64, 1, None);
        f.peer_up(0, 2, false);
        f.peer_up(0, ANCHOR, true);
        let mut security = Vec::new();
        for _ in 0..20 {
            while let Some((p, req)) = f.poll() {
                match (&req, p) {
                    (Request::Cvs { from, count, .. }, 2) => {
                        let answer = Answer::Cvs(
                            forged[*from as usize..(*from + u64::from(*count)) as usize].to_vec(),
                        );
                        security.extend(f.answer(0, p, &req, answer).misbehaved);
                    }
                    _ => security.extend(exchange(&mut f, 0, &honest, p, &req).1),
                }
            }
        }
        assert!(f.is_complete());
        assert_eq!(security.len(), 1, "{security:?}");
        assert!(security[0].contains("do not add up"), "{security:?}");
    }

    #[test]
    fn a_resumed_fetch_asks_only_for_what_is_missing() {
        let data = bytes(30 * GROUP as usize, 5);
        let hash = Hash::of(&data);
        let cvs = Cvs::of(&data);
        let held: Vec<bool> = (0..30).map(|g| g % 3 != 0).collect();
        let mut holders = BTreeMap::from([
            (ANCHOR, holder(&data, true, false)),
            (1, holder(&data, false, false)),
        ]);
        let mut f = Fetch::new(hash, data.len() as u64, 1, Some((cvs, held)));
        f.peer_up(0, ANCHOR, true);
        let mut nodes = vec![(f, 1)];
        let (served, _) = run(&mut nodes, &mut holders, &data);
        assert!(nodes[0].0.is_complete());
        assert_eq!(served[&ANCHOR], 10);
    }

    /// Ten nodes of a site fetch one blob together behind one anchor: the
    /// anchor serves it about once, the LAN passes it along.
    #[test]
    fn a_site_pulls_a_blob_across_the_uplink_about_once() {
        let data = bytes(400 * GROUP as usize, 6);
        let hash = Hash::of(&data);
        let mut holders = BTreeMap::from([(ANCHOR, holder(&data, true, false))]);
        let mut nodes = Vec::new();
        for me in 1..=10usize {
            holders.insert(me, holder(&data, false, false));
            let mut f = Fetch::new(hash, data.len() as u64, me, None);
            f.peer_up(0, ANCHOR, true);
            for other in 1..=10usize {
                if other != me {
                    f.peer_up(0, other, false);
                }
            }
            nodes.push((f, me));
        }
        let (served, _) = run(&mut nodes, &mut holders, &data);
        assert!(nodes.iter().all(|(f, _)| f.is_complete()));
        let from_anchor = served[&ANCHOR];
        assert!(
            from_anchor <= 600,
            "the anchor served {from_anchor} groups of 400: {served:?}"
        );
    }

    #[test]
    fn runs_are_found() {
        assert_eq!(runs_of(&[true, true, false, true]), [(0, 2), (3, 1)]);
        assert!(runs_of(&[false; 3]).is_empty());
        let p = Peer {
            runs: vec![(2, 3), (9, 1)],
            ..Peer::default()
        };
        assert!(
            !p.holds(1) && p.holds(2) && p.holds(4) && !p.holds(5) && p.holds(9) && !p.holds(10)
        );
    }
}
