//! The deterministic simulator: real sync engines over a simulated network
//! in virtual time, single-threaded and seeded.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use automerge::ChangeHash;
use automerge::sync::{ChunkList, Message, MessageVersion};
use crdt_state::doc::signing_message;
use crdt_state::sync::{Engine, Input, Output, SyncConfig, wants};
use crdt_state::verify::verify_and_apply;
use crdt_state::wire::Frame;
use crdt_state::{DocId, Document, Identity, PublicKey, Role, SignedChange, Trust};
use ed25519_dalek::SigningKey;
use serde::Serialize;

use crate::scenario::{Edit, Scenario};

/// Deterministic randomness (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn key(&mut self) -> SigningKey {
        let mut b = [0u8; 32];
        for chunk in b.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        SigningKey::from_bytes(&b)
    }
}

struct LinkState {
    a: usize,
    b: usize,
    latency_us: u64,
    jitter_us: u64,
    loss: f64,
    bandwidth: Option<u64>,
    up: bool,
    /// Bumped whenever the link goes down: frames of an older epoch are lost.
    epoch: u64,
    /// FIFO: no frame overtakes an earlier one in the same direction.
    last_delivery: [u64; 2],
    kind: String,
}

struct SimNode {
    name: String,
    group: String,
    identity: Identity,
    engine: Option<Engine>,
    /// What the node's store committed: changes per document.
    store: BTreeMap<DocId, Vec<(ChangeHash, SignedChange)>>,
    /// Saved sync states per (peer, document).
    sync_states: HashMap<(PublicKey, DocId), Vec<u8>>,
    skew: i64,
    starts: u64,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Scenario(usize),
    Deliver {
        link: usize,
        epoch: u64,
        from: usize,
        to: usize,
        frame: Vec<u8>,
    },
}

/// Traffic on one kind of link (a group pair).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Traffic {
    /// Frames delivered.
    pub messages: u64,
    /// Bytes delivered.
    pub bytes: u64,
}

/// What happened after a heal.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HealReport {
    /// Virtual time of the heal, seconds.
    pub at_s: f64,
    /// Time from the heal to the last change applied anywhere, milliseconds.
    pub converged_after_ms: f64,
}

/// Invariants checked at the end.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Invariants {
    /// Every live node holds the same heads for every document it keeps.
    pub converged: bool,
    /// Every change any node ever committed is held by every live node that keeps its document.
    pub nothing_lost: bool,
    /// No forged change was applied anywhere.
    pub no_forged_applied: bool,
    /// Expectations of the scenario that failed, in words.
    pub failed: Vec<String>,
}

/// The simulation's report (deterministic for a scenario and seed).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Seed used.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: usize,
    /// Virtual time simulated, seconds.
    pub virtual_seconds: f64,
    /// Events in order, as text.
    pub events: Vec<String>,
    /// Convergence after each heal.
    pub heals: Vec<HealReport>,
    /// Traffic per kind of link (a group pair).
    pub links: BTreeMap<String, Traffic>,
    /// Traffic per link (`node<->node`).
    pub per_link: BTreeMap<String, Traffic>,
    /// Fields in conflict at the end (on the first live anchor or node).
    pub conflicts: usize,
    /// Security events raised.
    pub security_events: usize,
    /// Invariants.
    pub invariants: Invariants,
    /// Replicas agreeing with the latest fleet heads, sampled over time (seconds, count).
    pub agreement: Vec<(f64, usize)>,
}

impl Report {
    /// Whether every invariant and expectation held.
    pub fn passed(&self) -> bool {
        self.invariants.converged
            && self.invariants.nothing_lost
            && self.invariants.no_forged_applied
            && self.invariants.failed.is_empty()
    }
}

/// A running simulation.
pub struct Sim {
    scenario: Scenario,
    rng: Rng,
    trust: Trust,
    nodes: Vec<SimNode>,
    links: Vec<LinkState>,
    by_pair: HashMap<(usize, usize), usize>,
    index: HashMap<PublicKey, usize>,
    operator: Identity,
    engineers: HashMap<String, Identity>,
    root: SigningKey,
    queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    now: u64,
    traffic: BTreeMap<String, Traffic>,
    per_link: BTreeMap<String, Traffic>,
    events: Vec<String>,
    heals: Vec<u64>,
    /// When changes were committed anywhere (virtual µs), in order.
    persist_times: Vec<u64>,
    security: usize,
    forged: HashSet<ChangeHash>,
    committed: HashMap<DocId, HashSet<ChangeHash>>,
    agreement: Vec<(f64, usize)>,
}

fn us(d: std::time::Duration) -> u64 {
    d.as_micros() as u64
}

impl Sim {
    /// Builds the fleet, its nodes and links; nothing runs yet.
    pub fn new(scenario: Scenario) -> Result<Sim, String> {
        let mut rng = Rng(scenario.seed);
        let root = rng.key();
        let root_pub = PublicKey(root.verifying_key().to_bytes());
        let mut trust = Trust::new(root_pub);
        let issue = |rng: &mut Rng,
                     name: &str,
                     role: Role,
                     site: Option<&str>|
         -> Result<Identity, String> {
            Identity::issue(&root, rng.key(), name, role, site, 0).map_err(|e| e.to_string())
        };
        let operator = issue(&mut rng, "operator", Role::Operator, None)?;
        trust
            .add_cert(operator.cert.clone())
            .map_err(|e| e.to_string())?;
        let mut nodes = Vec::new();
        let mut engineers = HashMap::new();
        for g in &scenario.groups {
            for k in 0..g.count {
                let name = format!("{}-{k}", g.name);
                let (role, site) = if g.role == "anchor" {
                    (Role::Anchor, None)
                } else {
                    (Role::Node, g.site.as_deref())
                };
                let identity = issue(&mut rng, &name, role, site)?;
                trust
                    .add_cert(identity.cert.clone())
                    .map_err(|e| e.to_string())?;
                nodes.push(SimNode {
                    name,
                    group: g.name.clone(),
                    identity,
                    engine: None,
                    store: BTreeMap::new(),
                    sync_states: HashMap::new(),
                    skew: 0,
                    starts: 0,
                });
            }
            if let Some(site) = &g.site
                && !engineers.contains_key(site)
            {
                let e = issue(
                    &mut rng,
                    &format!("engineer-{site}"),
                    Role::SiteEngineer,
                    Some(site),
                )?;
                trust.add_cert(e.cert.clone()).map_err(|e| e.to_string())?;
                engineers.insert(site.clone(), e);
            }
        }
        // A group, or one node of it (`g[i]`).
        let members = |r: &str| -> Vec<usize> {
            let (g, pick) = match r.split_once('[') {
                Some((g, rest)) => (g, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (r, None),
            };
            let all = nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.group == g)
                .map(|(i, _)| i);
            match pick {
                Some(k) => all.skip(k).take(1).collect(),
                None => all.collect(),
            }
        };
        let mut links = Vec::new();
        let mut by_pair = HashMap::new();
        for l in &scenario.links {
            let mut pairs = Vec::new();
            let kind;
            if let Some([a, b]) = &l.between {
                let (ma, mb) = (members(a), members(b));
                let (big, small) = if ma.len() >= mb.len() {
                    (ma, mb)
                } else {
                    (mb, ma)
                };
                for (i, x) in big.iter().enumerate() {
                    if let Some(y) = small.get(i % small.len().max(1)) {
                        pairs.push((*x, *y));
                    }
                }
                kind = format!("{a}<->{b}");
            } else if let Some(g) = &l.within {
                let m = members(g);
                for w in m.windows(2) {
                    pairs.push((w[0], w[1]));
                }
                if l.ring && m.len() > 2 {
                    pairs.push((m[m.len() - 1], m[0]));
                }
                kind = g.to_string();
            } else {
                continue;
            }
            for (a, b) in pairs {
                if a == b || by_pair.contains_key(&(a, b)) {
                    continue;
                }
                by_pair.insert((a, b), links.len());
                by_pair.insert((b, a), links.len());
                links.push(LinkState {
                    a,
                    b,
                    latency_us: us(l.latency.0),
                    jitter_us: us(l.jitter.0),
                    loss: l.loss,
                    bandwidth: l.bandwidth,
                    up: true,
                    epoch: 0,
                    last_delivery: [0, 0],
                    kind: kind.clone(),
                });
            }
        }
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.identity.key(), i))
            .collect();
        let mut sim = Sim {
            scenario,
            rng,
            trust,
            nodes,
            links,
            by_pair,
            index,
            operator,
            engineers,
            root,
            queue: BinaryHeap::new(),
            seq: 0,
            now: 0,
            traffic: BTreeMap::new(),
            per_link: BTreeMap::new(),
            events: Vec::new(),
            heals: Vec::new(),
            persist_times: Vec::new(),
            security: 0,
            forged: HashSet::new(),
            committed: HashMap::new(),
            agreement: Vec::new(),
        };
        let _ = &sim.root;
        for i in 0..sim.nodes.len() {
            sim.start(i);
        }
        for l in 0..sim.links.len() {
            sim.connect(l);
        }
        for i in 0..sim.scenario.events.len() {
            let at = us(sim.scenario.events[i].at.0);
            sim.push(at, Ev::Scenario(i));
        }
        Ok(sim)
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    /// (Re)starts a node from what its store committed.
    fn start(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut docs = Vec::new();
        for (id, changes) in &node.store {
            let mut doc = Document::new(id.clone());
            let signed: Vec<SignedChange> = changes.iter().map(|(_, c)| c.clone()).collect();
            if verify_and_apply(&self.trust, &mut doc, &signed).is_ok() {
                let sigs = changes.iter().map(|(h, c)| (*h, c.signature)).collect();
                docs.push((doc, sigs));
            }
        }
        let mut engine = Engine::new(
            node.identity.cert.clone(),
            self.trust.clone(),
            docs,
            SyncConfig::default(),
        );
        node.starts += 1;
        engine.set_actor_seed(self.scenario.seed ^ ((i as u64) << 20) ^ node.starts);
        node.engine = Some(engine);
    }

    fn connect(&mut self, l: usize) {
        let (a, b) = (self.links[l].a, self.links[l].b);
        if !self.links[l].up || self.nodes[a].engine.is_none() || self.nodes[b].engine.is_none() {
            return;
        }
        for (x, y) in [(a, b), (b, a)] {
            let peer = self.nodes[y].identity.key();
            let cert = self.nodes[y].identity.cert.clone();
            let saved: Vec<(DocId, Vec<u8>)> = self.nodes[x]
                .sync_states
                .iter()
                .filter(|((p, _), _)| *p == peer)
                .map(|((_, d), s)| (d.clone(), s.clone()))
                .collect();
            if let Some(e) = self.nodes[x].engine.as_mut() {
                e.handle(Input::Connected { peer, cert, saved });
            }
        }
        self.drain(a);
        self.drain(b);
    }

    fn disconnect(&mut self, l: usize) {
        let (a, b) = (self.links[l].a, self.links[l].b);
        self.links[l].epoch += 1;
        for (x, y) in [(a, b), (b, a)] {
            let peer = self.nodes[y].identity.key();
            if let Some(e) = self.nodes[x].engine.as_mut() {
                e.handle(Input::Disconnected { peer });
            }
        }
    }

    /// Carries out a node's outputs.
    fn drain(&mut self, i: usize) {
        loop {
            let Some(out) = self.nodes[i].engine.as_mut().and_then(Engine::poll_output) else {
                return;
            };
            match out {
                Output::Send { peer, frame } => {
                    let Some(&j) = self.index.get(&peer) else {
                        continue;
                    };
                    let Some(&l) = self.by_pair.get(&(i, j)) else {
                        continue;
                    };
                    self.transmit(l, i, j, frame);
                }
                Output::Persist { doc, changes } => {
                    let set = self.committed.entry(doc.clone()).or_default();
                    for (h, _) in &changes {
                        set.insert(*h);
                    }
                    self.nodes[i].store.entry(doc).or_default().extend(changes);
                    if self.persist_times.last() != Some(&self.now) {
                        self.persist_times.push(self.now);
                    }
                }
                Output::SaveSyncState { peer, doc, state } => {
                    self.nodes[i].sync_states.insert((peer, doc), state);
                }
                Output::Security { .. } => self.security += 1,
                Output::Disconnect { peer, .. } => {
                    if let Some(&j) = self.index.get(&peer)
                        && let Some(&l) = self.by_pair.get(&(i, j))
                    {
                        self.disconnect(l);
                    }
                }
                Output::Dropped { doc } => {
                    self.nodes[i].store.remove(&doc);
                    self.nodes[i].sync_states.retain(|(_, d), _| *d != doc);
                }
                Output::Changed { .. } => {}
            }
        }
    }

    fn transmit(&mut self, l: usize, from: usize, to: usize, frame: Vec<u8>) {
        let link = &self.links[l];
        if !link.up {
            return;
        }
        let mut delay = link.latency_us;
        if link.jitter_us > 0 {
            delay += self.rng.next() % (link.jitter_us + 1);
        }
        // QUIC retransmits what is lost: each loss costs about one more round trip.
        let packets = frame.len().div_ceil(1200).max(1);
        for _ in 0..packets {
            while link.loss > 0.0 && self.rng.unit() < link.loss {
                delay += 2 * link.latency_us + 1000;
            }
        }
        if let Some(bw) = link.bandwidth {
            delay += (frame.len() as u64 * 1_000_000) / bw.max(1);
        }
        let dir = usize::from(from != link.a);
        let at = (self.now + delay).max(link.last_delivery[dir]);
        let epoch = link.epoch;
        self.links[l].last_delivery[dir] = at;
        self.push(
            at,
            Ev::Deliver {
                link: l,
                epoch,
                from,
                to,
                frame,
            },
        );
    }

    fn node_ref(&self, r: &str) -> Result<usize, String> {
        let (g, k) = match r.split_once('[') {
            Some((g, rest)) => {
                let k: usize = rest
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| format!("bad node reference {r:?}"))?;
                (g, k)
            }
            None => (r, 0),
        };
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.group == g)
            .nth(k)
            .map(|(i, _)| i)
            .ok_or_else(|| format!("no node {r:?}"))
    }

    /// Which side of a partition each node is on: a side lists groups (all
    /// their nodes) and node references (`c[0]`); a name that matches
    /// neither, or a node on two sides, is an error that stops the run.
    fn sides(&self, sides: &[Vec<String>]) -> Result<Vec<Option<usize>>, String> {
        let mut side_of = vec![None; self.nodes.len()];
        for (k, side) in sides.iter().enumerate() {
            for r in side {
                let members: Vec<usize> = if r.contains('[') {
                    vec![self.node_ref(r)?]
                } else {
                    let m: Vec<usize> = (0..self.nodes.len())
                        .filter(|&i| self.nodes[i].group == *r)
                        .collect();
                    if m.is_empty() {
                        return Err(format!(
                            "partition names {r:?}, which is no group and no node"
                        ));
                    }
                    m
                };
                for i in members {
                    match side_of[i] {
                        Some(other) if other != k => {
                            return Err(format!(
                                "partition puts {} on two sides",
                                self.nodes[i].name
                            ));
                        }
                        _ => side_of[i] = Some(k),
                    }
                }
            }
        }
        Ok(side_of)
    }

    fn scenario_event(&mut self, idx: usize) -> Result<(), String> {
        let ev = self.scenario.events[idx].clone();
        let t = self.now as f64 / 1e6;
        if let Some(sides) = &ev.partition {
            self.events.push(format!("{t}s partition {sides:?}"));
            let side_of = self.sides(sides)?;
            for l in 0..self.links.len() {
                if let (Some(x), Some(y)) = (side_of[self.links[l].a], side_of[self.links[l].b])
                    && x != y
                    && self.links[l].up
                {
                    self.links[l].up = false;
                    self.disconnect(l);
                }
            }
        }
        if ev.heal == Some(true) {
            self.events.push(format!("{t}s heal"));
            self.heals.push(self.now);
            for l in 0..self.links.len() {
                if !self.links[l].up {
                    self.links[l].up = true;
                    self.connect(l);
                }
            }
        }
        if let Some(edit) = &ev.edit {
            self.events.push(format!(
                "{t}s edit {} on {} by {}",
                edit.doc, edit.on, edit.by
            ));
            self.edit(edit)?;
        }
        if let Some(r) = &ev.crash {
            let i = self.node_ref(r)?;
            self.events
                .push(format!("{t}s crash {}", self.nodes[i].name));
            for l in 0..self.links.len() {
                if self.links[l].a == i || self.links[l].b == i {
                    self.disconnect(l);
                }
            }
            self.nodes[i].engine = None;
        }
        if let Some(r) = &ev.restart {
            let i = self.node_ref(r)?;
            self.events
                .push(format!("{t}s restart {}", self.nodes[i].name));
            if self.nodes[i].engine.is_none() {
                self.start(i);
                for l in 0..self.links.len() {
                    if self.links[l].a == i || self.links[l].b == i {
                        self.connect(l);
                    }
                }
            }
        }
        if let Some(s) = &ev.skew {
            let i = self.node_ref(&s.node)?;
            let secs = s.secs().map_err(|e| e.to_string())?;
            self.events
                .push(format!("{t}s skew {} by {secs}s", self.nodes[i].name));
            self.nodes[i].skew = secs;
        }
        if let Some(r) = &ev.rogue {
            let i = self.node_ref(r)?;
            self.events
                .push(format!("{t}s rogue {}", self.nodes[i].name));
            self.forge(i);
        }
        Ok(())
    }

    fn edit(&mut self, e: &Edit) -> Result<(), String> {
        let i = self.node_ref(&e.on)?;
        let doc = DocId::parse(&e.doc).map_err(|x| x.to_string())?;
        let writer = if e.by == "operator" {
            self.operator.clone()
        } else if e.by == "node" {
            self.nodes[i].identity.clone()
        } else if let Some(site) = e.by.strip_prefix("site-engineer:") {
            self.engineers
                .get(site)
                .cloned()
                .ok_or_else(|| format!("no site {site}"))?
        } else {
            return Err(format!(
                "edit by {:?}: expected operator, node or site-engineer:<site>",
                e.by
            ));
        };
        let mut ops = BTreeMap::new();
        for (k, v) in &e.set {
            let json = serde_json::to_value(v).map_err(|x| x.to_string())?;
            ops.insert(k.clone(), Some(json.to_string()));
        }
        let now = (self.now / 1_000_000) as i64 + self.nodes[i].skew;
        let Some(engine) = self.nodes[i].engine.as_mut() else {
            return Ok(()); // a crashed node makes no edits
        };
        engine
            .edit(&doc, &writer, now, &ops)
            .map_err(|x| x.to_string())?;
        self.drain(i);
        Ok(())
    }

    /// Node `i` writes a fleet change it has no authority for, signs it with
    /// its own key, and sends it to every neighbour as a sync message.
    fn forge(&mut self, i: usize) {
        let me = self.nodes[i].identity.clone();
        let mut copy = Document::new(DocId::Fleet);
        let ops = BTreeMap::from([(
            "apps.rogue.native.command".to_string(),
            Some("[\"/bin/sh\"]".to_string()),
        )]);
        let Ok(Some((hash, change, _))) = copy.edit_with_actor(&me, 0, &ops, Some([0xee; 16]))
        else {
            return;
        };
        self.forged.insert(hash);
        let msg = Message {
            heads: vec![hash],
            need: vec![],
            have: vec![],
            changes: ChunkList::from(vec![change.bytes.clone()]),
            flags: None,
            version: MessageVersion::V1,
        };
        let frame = Frame::Sync {
            doc: DocId::Fleet,
            msg: msg.encode(),
            sigs: vec![me.sign(&signing_message(&DocId::Fleet, &hash))],
        }
        .encode();
        let neighbours: Vec<(usize, usize)> = self
            .links
            .iter()
            .enumerate()
            .filter(|(_, l)| l.up && (l.a == i || l.b == i))
            .map(|(k, l)| (k, if l.a == i { l.b } else { l.a }))
            .collect();
        for (l, j) in neighbours {
            self.transmit(l, i, j, frame.clone());
        }
    }

    fn agreeing(&self) -> usize {
        let heads: Vec<Option<Vec<ChangeHash>>> = self
            .nodes
            .iter()
            .map(|n| {
                n.engine
                    .as_ref()
                    .and_then(|e| e.doc(&DocId::Fleet))
                    .map(|d| {
                        let mut h = d.heads();
                        h.sort();
                        h
                    })
            })
            .collect();
        let mut counts: HashMap<&Vec<ChangeHash>, usize> = HashMap::new();
        for h in heads.iter().flatten() {
            *counts.entry(h).or_default() += 1;
        }
        counts.values().copied().max().unwrap_or(0)
    }

    /// Runs to the end and reports.
    pub fn run(mut self, mut progress: impl FnMut(f64)) -> Result<Report, String> {
        let end = us(self.scenario.duration.0);
        let sample_every = (end / 200).max(1);
        let mut next_sample = 0;
        while let Some(Reverse((at, _, ev))) = self.queue.pop() {
            if at > end {
                break;
            }
            while at >= next_sample {
                self.agreement
                    .push((next_sample as f64 / 1e6, self.agreeing()));
                progress(next_sample as f64 / end as f64);
                next_sample += sample_every;
            }
            self.now = at;
            match ev {
                Ev::Scenario(i) => self.scenario_event(i)?,
                Ev::Deliver {
                    link,
                    epoch,
                    from,
                    to,
                    frame,
                } => {
                    let l = &self.links[link];
                    if !l.up || l.epoch != epoch || self.nodes[to].engine.is_none() {
                        continue;
                    }
                    let t = self.traffic.entry(l.kind.clone()).or_default();
                    t.messages += 1;
                    t.bytes += frame.len() as u64;
                    let name = format!("{}<->{}", self.nodes[l.a].name, self.nodes[l.b].name);
                    let t = self.per_link.entry(name).or_default();
                    t.messages += 1;
                    t.bytes += frame.len() as u64;
                    let peer = self.nodes[from].identity.key();
                    if let Some(e) = self.nodes[to].engine.as_mut() {
                        e.handle(Input::Received { peer, frame });
                    }
                    self.drain(to);
                }
            }
        }
        self.agreement.push((end as f64 / 1e6, self.agreeing()));
        Ok(self.report())
    }

    fn report(self) -> Report {
        // Convergence: every live node holds the same heads for what it keeps.
        let mut converged = true;
        let mut nothing_lost = true;
        let mut no_forged = true;
        let live: Vec<&SimNode> = self.nodes.iter().filter(|n| n.engine.is_some()).collect();
        let all_docs: HashSet<DocId> = self.committed.keys().cloned().collect();
        let superseded = |id: &DocId| match id {
            DocId::Node { name, epoch } => all_docs
                .iter()
                .any(|d| matches!(d, DocId::Node { name: n, epoch: e } if n == name && e > epoch)),
            _ => false,
        };
        for id in &all_docs {
            if superseded(id) {
                continue; // an old node epoch, dropped by design
            }
            let mut seen: Option<Vec<ChangeHash>> = None;
            for n in &live {
                if !wants(&self.trust, &n.identity.cert, id) {
                    continue;
                }
                let engine = n.engine.as_ref();
                let doc = engine.and_then(|e| e.doc(id));
                let mut heads = doc.map(|d| d.heads()).unwrap_or_default();
                heads.sort();
                match &seen {
                    None => seen = Some(heads),
                    Some(h) if *h != heads => converged = false,
                    Some(_) => {}
                }
                if let Some(set) = self.committed.get(id)
                    && !set.iter().all(|h| doc.is_some_and(|d| d.has_change(h)))
                {
                    nothing_lost = false;
                }
                if self
                    .forged
                    .iter()
                    .any(|h| doc.is_some_and(|d| d.has_change(h)))
                {
                    no_forged = false;
                }
            }
        }
        let conflicts = live
            .first()
            .and_then(|n| n.engine.as_ref())
            .map(|e| e.docs().map(|d| d.conflicts().len()).sum())
            .unwrap_or(0);
        // Convergence after a heal: the last change committed anywhere
        // before the next scripted event (later edits are not the merge).
        let mut starts: Vec<u64> = self.scenario.events.iter().map(|e| us(e.at.0)).collect();
        starts.sort_unstable();
        let heals: Vec<HealReport> = self
            .heals
            .iter()
            .map(|at| {
                let next = starts
                    .iter()
                    .copied()
                    .find(|t| *t > *at)
                    .unwrap_or(u64::MAX);
                let last = self
                    .persist_times
                    .iter()
                    .copied()
                    .filter(|t| *t >= *at && *t < next)
                    .max()
                    .unwrap_or(*at);
                HealReport {
                    at_s: *at as f64 / 1e6,
                    converged_after_ms: (last - at) as f64 / 1e3,
                }
            })
            .collect();
        let mut failed = Vec::new();
        if let Some(within) = self.scenario.expect.converged_within {
            if !converged {
                failed.push("replicas did not converge".to_string());
            }
            if let Some(h) = heals.last()
                && h.converged_after_ms > within.0.as_secs_f64() * 1e3
            {
                failed.push(format!(
                    "converged {:.1} ms after the last heal, expected within {:.1} ms",
                    h.converged_after_ms,
                    within.0.as_secs_f64() * 1e3
                ));
            }
        }
        if let Some(c) = self.scenario.expect.conflicts
            && c != conflicts
        {
            failed.push(format!("{conflicts} fields in conflict, expected {c}"));
        }
        Report {
            name: self.scenario.name.clone(),
            seed: self.scenario.seed,
            nodes: self.nodes.len(),
            virtual_seconds: self.scenario.duration.0.as_secs_f64(),
            events: self.events,
            heals,
            links: self.traffic,
            per_link: self.per_link,
            conflicts,
            security_events: self.security,
            invariants: Invariants {
                converged,
                nothing_lost,
                no_forged_applied: no_forged,
                failed,
            },
            agreement: self.agreement,
        }
    }
}

/// Runs a scenario text with an optional seed override.
pub fn run_scenario(
    text: &str,
    seed: Option<u64>,
    progress: impl FnMut(f64),
) -> Result<Report, String> {
    let mut s = Scenario::parse(text).map_err(|e| e.to_string())?;
    if let Some(seed) = seed {
        s.seed = seed;
    }
    Sim::new(s)?.run(progress)
}

impl Report {
    /// An SVG plot of "replicas agreeing with the latest fleet state over
    /// time", with the scenario's events marked.
    pub fn plot_svg(&self) -> String {
        let (w, h, pad) = (800.0, 300.0, 40.0);
        let t_end = self.virtual_seconds.max(1e-9);
        let n = self.nodes.max(1) as f64;
        let x = |t: f64| pad + (t / t_end) * (w - 2.0 * pad);
        let y = |c: f64| h - pad - (c / n) * (h - 2.0 * pad);
        let points: Vec<String> = self
            .agreement
            .iter()
            .map(|(t, c)| format!("{:.1},{:.1}", x(*t), y(*c as f64)))
            .collect();
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{pad}\" y=\"20\" font-size=\"13\">{} (seed {}): replicas agreeing with the latest fleet state</text>\n\
             <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
             <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n\
             <text x=\"4\" y=\"{}\">{}</text><text x=\"4\" y=\"{}\">0</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0} s</text>\n",
            self.name,
            self.seed,
            h - pad,
            w - pad,
            h - pad,
            h - pad,
            pad + 4.0,
            self.nodes,
            h - pad,
            w - pad,
            h - pad + 16.0,
            t_end
        );
        for e in &self.events {
            if let Some(t) = e.split('s').next().and_then(|s| s.parse::<f64>().ok()) {
                svg.push_str(&format!(
                    "<line x1=\"{0:.1}\" y1=\"{pad}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#bbb\" stroke-dasharray=\"3,3\"><title>{2}</title></line>\n",
                    x(t),
                    h - pad,
                    e.replace('<', "&lt;").replace('"', "&quot;")
                ));
            }
        }
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n</svg>\n",
            points.join(" ")
        ));
        svg
    }
}
