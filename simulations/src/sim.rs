//! The deterministic simulator: the shipped daemon cores (`daemon::Core`,
//! with the real sync engine inside) over a simulated network in virtual
//! time, single-threaded and seeded. The simulator is their driver: it
//! carries out their actions as the node's and anchor's drivers do, with a
//! store that commits after `commit_latency` and loses what a crash
//! interrupts.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

use automerge::ChangeHash;
use automerge::sync::{ChunkList, Message, MessageVersion};
use crdt_state::fleet::model::{FleetView, WorkloadReport, WorkloadState};
use crdt_state::signed::doc::signing_message;
use crdt_state::signed::sync::{Engine, SyncConfig, wants};
use crdt_state::signed::verify::verify_and_apply;
use crdt_state::signed::wire::Frame;
use crdt_state::{DocId, Document, Identity, PublicKey, Role, SignedChange, Trust};
use daemon::{Action, Arrival, Core, Now, Settings};
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
    /// The daemon core, as shipped (None: crashed).
    core: Option<Core<usize>>,
    /// What the node's store committed: changes per document (the bytes
    /// of a change every node stores, such as the registry, held once).
    store: BTreeMap<DocId, Vec<(ChangeHash, Arc<SignedChange>)>>,
    /// Saved sync states per (peer, document).
    sync_states: HashMap<PublicKey, BTreeMap<DocId, Vec<u8>>>,
    skew: i64,
    starts: u64,
    /// What its pretend runtime runs (with `runtime`), by app.
    apps: BTreeMap<String, SimApp>,
    /// Every version it ever ran.
    ran: BTreeSet<String>,
}

/// One app on a node's pretend runtime.
struct SimApp {
    version: Option<String>,
    revision: String,
    state: WorkloadState,
    restarts: u32,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Scenario(usize),
    /// A node's store finished a commit (lost if the node crashed since).
    Committed {
        node: usize,
        starts: u64,
        batch: u64,
    },
    Deliver {
        link: usize,
        epoch: u64,
        from: usize,
        to: usize,
        frame: Vec<u8>,
    },
    /// A core's tick, with `runtime`: anchors every second (gates); nodes
    /// once at start (their first reconcile; a change of their desired
    /// state arriving in a frame reconciles at once).
    Tick {
        node: usize,
        starts: u64,
    },
    /// An app on a node's pretend runtime is running, or has failed.
    AppState {
        node: usize,
        starts: u64,
        app: String,
        revision: String,
        failed: bool,
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
    /// Every change any node's store committed (so acknowledged) is held by
    /// every live node that keeps its document. What a node applied but had
    /// not committed when it crashed may be lost; nothing was sent of it.
    pub nothing_lost: bool,
    /// No forged change was applied anywhere.
    pub no_forged_applied: bool,
    /// No change lost by a crash before its writer committed it reached
    /// any other node (commit before send).
    pub nothing_sent_before_commit: bool,
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
    /// Edits lost because their node crashed before its store committed
    /// them (never acknowledged, so allowed to be lost).
    pub uncommitted_lost: usize,
    /// Invariants.
    pub invariants: Invariants,
    /// Replicas agreeing with the latest fleet heads, sampled over time (seconds, count).
    pub agreement: Vec<(f64, usize)>,
    /// Rollouts at the end (with `runtime`), by app.
    pub rollouts: BTreeMap<String, RolloutSummary>,
}

/// A rollout at the end of a run.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RolloutSummary {
    /// `rolling`, `paused`, `halted`, `aborted` or `done`.
    pub phase: String,
    /// The version rolled out.
    pub version: Option<String>,
    /// Waves open, wave 0 included.
    pub waves_open: usize,
    /// Nodes in each wave.
    pub wave_sizes: Vec<usize>,
    /// The decisions: virtual second (the writer's clock), what, by whom.
    pub decisions: Vec<String>,
    /// Live nodes running each version of the app.
    pub running: BTreeMap<String, usize>,
    /// Nodes that ever ran a bad version of the app.
    pub ran_bad: usize,
    /// Nodes that rolled back on their own.
    pub rolled_back: usize,
}

impl Report {
    /// Whether every invariant and expectation held.
    pub fn passed(&self) -> bool {
        self.invariants.converged
            && self.invariants.nothing_lost
            && self.invariants.no_forged_applied
            && self.invariants.nothing_sent_before_commit
            && self.invariants.failed.is_empty()
    }
}

/// A document's signatures, by change.
type Sigs = HashMap<ChangeHash, [u8; 64]>;

/// A running simulation.
pub struct Sim {
    scenario: Scenario,
    rng: Rng,
    trust: Trust,
    nodes: Vec<SimNode>,
    links: Vec<LinkState>,
    by_pair: HashMap<(usize, usize), usize>,
    operator: Identity,
    engineers: HashMap<String, Identity>,
    root: SigningKey,
    queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    now: u64,
    /// Traffic per link, by link index (named and summed by kind in the
    /// report, not on every frame).
    per_link: HashMap<usize, Traffic>,
    events: Vec<String>,
    heals: Vec<u64>,
    /// When changes were committed anywhere (virtual µs), in order.
    persist_times: Vec<u64>,
    security: usize,
    forged: HashSet<ChangeHash>,
    committed: HashMap<DocId, HashSet<ChangeHash>>,
    /// Edits made by the scenario, and on which node.
    written: HashMap<ChangeHash, usize>,
    /// Edits whose writer crashed before committing them.
    lost: HashSet<ChangeHash>,
    /// Commits under way: (node, its start count, batch) → changes.
    writing: HashMap<(usize, u64, u64), daemon::core::Batch>,
    agreement: Vec<(f64, usize)>,
    /// Rollbacks nodes made on their own.
    rollbacks: usize,
    /// Documents loaded at the start, by what was stored: nodes whose
    /// stores hold the same changes start from one loaded copy (shared
    /// until one changes it). Emptied once every node started.
    loaded: HashMap<(DocId, Vec<ChangeHash>), (Document, Sigs)>,
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
                    core: None,
                    store: BTreeMap::new(),
                    sync_states: HashMap::new(),
                    skew: 0,
                    starts: 0,
                    apps: BTreeMap::new(),
                    ran: BTreeSet::new(),
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
        let mut sim = Sim {
            scenario,
            rng,
            trust,
            nodes,
            links,
            by_pair,
            operator,
            engineers,
            root,
            queue: BinaryHeap::new(),
            seq: 0,
            now: 0,
            per_link: HashMap::new(),
            events: Vec::new(),
            heals: Vec::new(),
            persist_times: Vec::new(),
            security: 0,
            forged: HashSet::new(),
            committed: HashMap::new(),
            writing: HashMap::new(),
            written: HashMap::new(),
            lost: HashSet::new(),
            agreement: Vec::new(),
            rollbacks: 0,
            loaded: HashMap::new(),
        };
        let _ = &sim.root;
        // Documents that hold the same changes are shared between the
        // cores until one of them changes (ADR 0016): thousands of nodes
        // in one process hold one fleet document, not thousands.
        crdt_state::signed::doc::share_applied(true);
        if sim.scenario.runtime.is_some() {
            sim.register_nodes()?;
        }
        for i in 0..sim.nodes.len() {
            sim.start(i);
        }
        sim.loaded.clear();
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
            let key = (id.clone(), changes.iter().map(|(h, _)| *h).collect());
            if let Some((doc, sigs)) = self.loaded.get(&key) {
                docs.push((doc.clone(), sigs.clone()));
                continue;
            }
            let mut doc = Document::new(id.clone());
            let signed: Vec<SignedChange> = changes.iter().map(|(_, c)| (**c).clone()).collect();
            if verify_and_apply(&self.trust, &mut doc, &signed).is_ok() {
                let sigs: Sigs = changes.iter().map(|(h, c)| (*h, c.signature)).collect();
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
        let runtime = self.scenario.runtime.is_some();
        let anchor = node.identity.cert.role == Role::Anchor;
        let settings = Settings {
            // Every sync state is saved as it comes (the simulator keeps
            // them in memory; a crash loses none).
            state_flush_ms: 0,
            workloads: runtime && !anchor,
            gates: runtime && anchor,
            // Reconciles come with changes of the desired state here.
            reconcile_every_ms: u64::MAX,
            ..Settings::default()
        };
        node.core = Some(Core::new(engine, node.identity.clone(), settings));
        node.apps.clear();
        let starts = node.starts;
        if runtime {
            let now = self.clock(i);
            if let Some(core) = self.nodes[i].core.as_mut() {
                core.start(now);
            }
            // Anchors judge gates every second; a node reconciles at start.
            let at = self.now + if anchor { 1_000_000 } else { 1_000 };
            self.push(at, Ev::Tick { node: i, starts });
        }
    }

    /// Registers every node in the fleet document (with its site), as the
    /// operator: placement needs the registry. The scenario starts with
    /// every node enrolled and synced: the registry is in every store, as
    /// a node's store holds it once it synced after enrolling. Making
    /// thousands of nodes sync it at time zero would measure the
    /// enrollment of a whole fleet at once, not the scenario.
    fn register_nodes(&mut self) -> Result<(), String> {
        let mut ops = BTreeMap::new();
        for n in &self.nodes {
            if let Some(site) = &n.identity.cert.site {
                let base = format!("nodes.{}", n.name);
                ops.insert(base.clone(), Some("\"Node\"".to_string()));
                ops.insert(
                    format!("{base}.site"),
                    Some(serde_json::Value::String(site.clone()).to_string()),
                );
            }
        }
        if !self
            .nodes
            .iter()
            .any(|n| n.identity.cert.role == Role::Anchor)
        {
            return Err("a scenario with `runtime` needs an anchor".into());
        }
        let actor = {
            let mut a = [0u8; 16];
            a[..8].copy_from_slice(&self.rng.next().to_be_bytes());
            a
        };
        let Some((hash, change, _)) = Document::new(DocId::Fleet)
            .edit_with_actor(&self.operator, 0, &ops, Some(actor))
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        // Loaded as a node loads it: verified, into a document of its own
        // (not the writer's, whose actor only the writer may use).
        let mut loaded = Document::new(DocId::Fleet);
        verify_and_apply(&self.trust, &mut loaded, std::slice::from_ref(&change))
            .map_err(|e| format!("the registry: {e}"))?;
        let sigs = HashMap::from([(hash, change.signature)]);
        let change = Arc::new(change);
        self.loaded
            .insert((DocId::Fleet, vec![hash]), (loaded, sigs));
        self.committed.entry(DocId::Fleet).or_default().insert(hash);
        for n in &mut self.nodes {
            if wants(&self.trust, &n.identity.cert, &DocId::Fleet) {
                n.store
                    .entry(DocId::Fleet)
                    .or_default()
                    .push((hash, change.clone()));
            }
        }
        Ok(())
    }

    /// A node's pretend runtime takes its share: a new revision of an app
    /// starts (running after `start`, or failed after `fail_after` for a
    /// bad version); apps no longer in the share stop.
    fn run_share(&mut self, i: usize) {
        let Some(rt) = self.scenario.runtime.clone() else {
            return;
        };
        let Some(core) = self.nodes[i].core.as_mut() else {
            return;
        };
        let share = core.share();
        let starts = self.nodes[i].starts;
        let node = &mut self.nodes[i];
        node.apps.retain(|a, _| share.iter().any(|w| &w.app == a));
        let mut timers = Vec::new();
        for w in share {
            if node
                .apps
                .get(&w.app)
                .is_some_and(|a| a.revision == w.revision)
            {
                continue;
            }
            let bad = w.spec.version.as_ref().is_some_and(|v| rt.bad.contains(v));
            if let Some(v) = &w.spec.version {
                node.ran.insert(v.clone());
            }
            let after = if bad { rt.fail_after } else { rt.start };
            timers.push((
                us(after.0),
                Ev::AppState {
                    node: i,
                    starts,
                    app: w.app.clone(),
                    revision: w.revision.clone(),
                    failed: bad,
                },
            ));
            node.apps.insert(
                w.app.clone(),
                SimApp {
                    version: w.spec.version.clone(),
                    revision: w.revision,
                    state: WorkloadState::Pending,
                    restarts: 0,
                },
            );
        }
        for (after, ev) in timers {
            self.push(self.now + after, ev);
        }
        self.report_runtime(i);
    }

    /// The node's core hears its pretend runtime's status.
    fn report_runtime(&mut self, i: usize) {
        let now = self.clock(i);
        let node = &mut self.nodes[i];
        let workloads = node
            .apps
            .iter()
            .map(|(a, s)| {
                (
                    a.clone(),
                    WorkloadReport {
                        state: s.state,
                        reason: (s.state == WorkloadState::Failed)
                            .then(|| "exited with code 1".to_string()),
                        restarts: s.restarts,
                        version: s.version.clone(),
                        revision: None,
                    },
                )
            })
            .collect();
        if let Some(core) = node.core.as_mut() {
            core.report(now, workloads, BTreeMap::new(), BTreeMap::new());
        }
        self.act(i);
    }

    /// The time as node `i`'s clock tells it.
    fn clock(&self, i: usize) -> Now {
        Now {
            mono_ms: self.now / 1000,
            unix_s: (self.now / 1_000_000) as i64 + self.nodes[i].skew,
        }
    }

    fn connect(&mut self, l: usize) {
        let (a, b) = (self.links[l].a, self.links[l].b);
        if !self.links[l].up || self.nodes[a].core.is_none() || self.nodes[b].core.is_none() {
            return;
        }
        let root = self.trust.root();
        for (x, y) in [(a, b), (b, a)] {
            let key = self.nodes[y].identity.key();
            let hello = daemon::hello::encode(root, &self.nodes[y].identity.cert);
            let now = self.clock(x);
            let from = self.nodes[y].name.clone();
            let node = &mut self.nodes[x];
            let states = &node.sync_states;
            let arrival = Arrival {
                conn: y,
                bytes: &hello,
                proves: &|k| *k == key,
                from: &from,
                dialable: None,
            };
            if let Some(core) = node.core.as_mut() {
                core.hello(now, arrival, &mut |peer| {
                    states
                        .get(peer)
                        .map(|s| s.iter().map(|(d, s)| (d.clone(), s.clone())).collect())
                        .unwrap_or_default()
                });
            }
        }
        self.act(a);
        self.act(b);
    }

    fn disconnect(&mut self, l: usize) {
        let (a, b) = (self.links[l].a, self.links[l].b);
        self.links[l].epoch += 1;
        for (x, y) in [(a, b), (b, a)] {
            let now = self.clock(x);
            if let Some(core) = self.nodes[x].core.as_mut() {
                core.down(now, y);
            }
        }
    }

    /// Carries out node `i`'s actions, as a daemon's driver would.
    fn act(&mut self, i: usize) {
        loop {
            let Some(action) = self.nodes[i].core.as_mut().and_then(Core::poll_action) else {
                return;
            };
            match action {
                Action::Send { conn: j, frame } => {
                    let Some(&l) = self.by_pair.get(&(i, j)) else {
                        continue;
                    };
                    self.transmit(l, i, j, frame);
                }
                Action::Commit { batch, changes, .. } => {
                    let latency = us(self.scenario.commit_latency.0);
                    let starts = self.nodes[i].starts;
                    if latency == 0 {
                        self.store(i, batch, changes);
                    } else {
                        self.writing.insert((i, starts, batch), changes);
                        let ev = Ev::Committed {
                            node: i,
                            starts,
                            batch,
                        };
                        self.push(self.now + latency, ev);
                    }
                }
                Action::SaveSyncStates(states) => {
                    for (peer, doc, state) in states {
                        self.nodes[i]
                            .sync_states
                            .entry(peer)
                            .or_default()
                            .insert(doc, state);
                    }
                }
                Action::Security { .. } => self.security += 1,
                Action::Disconnect { conn: j, .. } | Action::Reject { conn: j, .. } => {
                    if let Some(&l) = self.by_pair.get(&(i, j)) {
                        self.disconnect(l);
                    }
                }
                Action::DropDoc(doc) => {
                    self.nodes[i].store.remove(&doc);
                    for states in self.nodes[i].sync_states.values_mut() {
                        states.remove(&doc);
                    }
                }
                Action::Reconcile => self.run_share(i),
                Action::RolledBack { .. } => self.rollbacks += 1,
                Action::Admit { .. }
                | Action::SavePeers(_)
                | Action::Report
                | Action::Changed(_)
                | Action::Contact { .. }
                | Action::Heard { .. }
                | Action::Timeline { .. } => {}
            }
        }
    }

    /// Node `i`'s store committed a batch: from now on it survives a crash.
    fn store(
        &mut self,
        i: usize,
        batch: u64,
        changes: Vec<(DocId, Vec<(ChangeHash, SignedChange)>)>,
    ) {
        for (doc, changes) in changes {
            let set = self.committed.entry(doc.clone()).or_default();
            for (h, _) in &changes {
                set.insert(*h);
            }
            self.nodes[i]
                .store
                .entry(doc)
                .or_default()
                .extend(changes.into_iter().map(|(h, c)| (h, Arc::new(c))));
        }
        if self.persist_times.last() != Some(&self.now) {
            self.persist_times.push(self.now);
        }
        let now = self.clock(i);
        if let Some(core) = self.nodes[i].core.as_mut() {
            core.committed(now, batch, Ok(()));
        }
        self.act(i);
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
            self.nodes[i].core = None;
        }
        if let Some(r) = &ev.restart {
            let i = self.node_ref(r)?;
            self.events
                .push(format!("{t}s restart {}", self.nodes[i].name));
            if self.nodes[i].core.is_none() {
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
        if let Some(a) = &ev.apply {
            let i = self.node_ref(&a.on)?;
            self.events
                .push(format!("{t}s apply on {}", self.nodes[i].name));
            let ms = crdt_state::fleet::manifest::parse("apply", &a.manifest)
                .map_err(|e| e.to_string())?;
            let now = self.clock(i);
            let op = self.operator.clone();
            if let Some(core) = self.nodes[i].core.as_mut() {
                let (_, edits) = crdt_state::local::datadir::plan_apply(&ms, &|id| core.doc(id));
                core.write_many(now, &edits, &op, None)
                    .map_err(|e| e.to_string())?;
            }
            self.act(i);
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
        let now = self.clock(i);
        let Some(core) = self.nodes[i].core.as_mut() else {
            return Ok(()); // a crashed node makes no edits
        };
        let hash = core
            .write(now, &doc, &writer, &ops)
            .map_err(|x| x.to_string())?;
        if let Some(h) = hash {
            self.written.insert(h, i);
        }
        self.act(i);
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
                n.core.as_ref().and_then(|c| c.doc(&DocId::Fleet)).map(|d| {
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
                Ev::Committed {
                    node,
                    starts,
                    batch,
                } => {
                    let changes = self.writing.remove(&(node, starts, batch));
                    // A crash since the commit began lost it (and nothing
                    // that followed it was sent).
                    if let Some(changes) = changes {
                        if self.nodes[node].core.is_some() && self.nodes[node].starts == starts {
                            self.store(node, batch, changes);
                        } else {
                            for (_, c) in &changes {
                                for (h, _) in c {
                                    if self.written.get(h) == Some(&node) {
                                        self.lost.insert(*h);
                                    }
                                }
                            }
                        }
                    }
                }
                Ev::Deliver {
                    link,
                    epoch,
                    from,
                    to,
                    frame,
                } => {
                    let l = &self.links[link];
                    if !l.up || l.epoch != epoch || self.nodes[to].core.is_none() {
                        continue;
                    }
                    let t = self.per_link.entry(link).or_default();
                    t.messages += 1;
                    t.bytes += frame.len() as u64;
                    let now = self.clock(to);
                    if let Some(core) = self.nodes[to].core.as_mut() {
                        core.frame(now, from, frame);
                    }
                    self.act(to);
                }
                Ev::Tick { node, starts } => {
                    if self.nodes[node].core.is_none() || self.nodes[node].starts != starts {
                        continue;
                    }
                    let now = self.clock(node);
                    if let Some(core) = self.nodes[node].core.as_mut() {
                        core.tick(now);
                    }
                    if self.nodes[node].identity.cert.role == Role::Anchor {
                        self.push(self.now + 1_000_000, Ev::Tick { node, starts });
                    }
                    self.act(node);
                }
                Ev::AppState {
                    node,
                    starts,
                    app,
                    revision,
                    failed,
                } => {
                    if self.nodes[node].core.is_none() || self.nodes[node].starts != starts {
                        continue;
                    }
                    let Some(a) = self.nodes[node].apps.get_mut(&app) else {
                        continue;
                    };
                    if a.revision != revision {
                        continue;
                    }
                    if failed {
                        a.state = WorkloadState::Failed;
                        a.restarts = 2;
                    } else {
                        a.state = WorkloadState::Running;
                    }
                    self.report_runtime(node);
                }
            }
        }
        self.agreement.push((end as f64 / 1e6, self.agreeing()));
        Ok(self.report())
    }

    /// Every rollout as the first live anchor holds it, with what the
    /// nodes' pretend runtimes run.
    fn rollout_summaries(&self) -> BTreeMap<String, RolloutSummary> {
        let Some(rt) = &self.scenario.runtime else {
            return BTreeMap::new();
        };
        let Some(fleet) = self
            .nodes
            .iter()
            .filter(|n| n.identity.cert.role == Role::Anchor)
            .find_map(|n| n.core.as_ref().and_then(|c| c.doc(&DocId::Fleet)))
        else {
            return BTreeMap::new();
        };
        let view = FleetView::read(fleet);
        let mut out = BTreeMap::new();
        for (app, state) in &view.rollouts {
            let status = view.apps.get(app).and_then(|a| {
                let p = a.rollout.as_ref()?;
                Some(crdt_state::fleet::rollout::waves(
                    &view,
                    app,
                    a,
                    p,
                    &state.revision,
                ))
            });
            let mut sizes = Vec::new();
            for w in status.iter().flat_map(|m| m.values()) {
                if sizes.len() <= *w {
                    sizes.resize(*w + 1, 0);
                }
                sizes[*w] += 1;
            }
            let mut running = BTreeMap::new();
            let mut ran_bad = 0;
            for n in &self.nodes {
                if let Some(a) = n.apps.get(app)
                    && n.core.is_some()
                {
                    *running
                        .entry(a.version.clone().unwrap_or_default())
                        .or_insert(0) += 1;
                }
                if n.ran.iter().any(|v| rt.bad.contains(v)) {
                    ran_bad += 1;
                }
            }
            let mut decisions: Vec<(i64, String)> = state
                .opened
                .iter()
                .map(|(i, m)| (m.at, format!("open wave {i} by {}", m.by)))
                .collect();
            for (what, m) in [
                ("halt", &state.halted),
                ("abort", &state.aborted),
                ("done", &state.done),
            ] {
                if let Some(m) = m {
                    decisions.push((m.at, format!("{what} by {}: {}", m.by, m.reason)));
                }
            }
            decisions.sort();
            let phase = state.phase();
            out.insert(
                app.clone(),
                RolloutSummary {
                    phase: phase.into(),
                    version: view.apps.get(app).and_then(|a| a.version.clone()),
                    waves_open: (0..sizes.len().max(1))
                        .filter(|i| state.is_open(*i) || state.done.is_some())
                        .count(),
                    wave_sizes: sizes,
                    decisions: decisions
                        .into_iter()
                        .map(|(at, d)| format!("{at}s {d}"))
                        .collect(),
                    running,
                    ran_bad,
                    rolled_back: self.rollbacks,
                },
            );
        }
        out
    }

    fn report(self) -> Report {
        // Convergence: every live node holds the same heads for what it keeps.
        let mut converged = true;
        let mut nothing_lost = true;
        let mut no_forged = true;
        let live: Vec<&SimNode> = self.nodes.iter().filter(|n| n.core.is_some()).collect();
        let all_docs: HashSet<DocId> = self.committed.keys().cloned().collect();
        let mut newest: HashMap<&str, u32> = HashMap::new();
        for d in &all_docs {
            if let DocId::Node { name, epoch } = d {
                let e = newest.entry(name.as_str()).or_default();
                *e = (*e).max(*epoch);
            }
        }
        let superseded = |id: &DocId| match id {
            DocId::Node { name, epoch } => newest.get(name.as_str()).is_some_and(|e| e > epoch),
            _ => false,
        };
        let index: HashMap<&str, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        // A node holds another node's document only when a path of node
        // links leads to it: anchors do not hand it down (ADR 0012).
        let is_node = |i: usize| self.nodes[i].identity.cert.role == Role::Node;
        let mut site_links: HashMap<usize, Vec<usize>> = HashMap::new();
        for (a, b) in self.by_pair.keys() {
            if is_node(*a) && is_node(*b) {
                site_links.entry(*a).or_default().push(*b);
            }
        }
        let not_nodes: Vec<usize> = (0..self.nodes.len()).filter(|i| !is_node(*i)).collect();
        let everyone: Vec<usize> = (0..self.nodes.len()).collect();
        for id in &all_docs {
            if superseded(id) {
                continue; // an old node epoch, dropped by design
            }
            let mut reach: Option<HashSet<usize>> = None;
            if let DocId::Node { name, .. } = id
                && let Some(&owner) = index.get(name.as_str())
            {
                let mut seen = HashSet::from([owner]);
                let mut todo = vec![owner];
                while let Some(i) = todo.pop() {
                    for j in site_links.get(&i).into_iter().flatten() {
                        if wants(&self.trust, &self.nodes[*j].identity.cert, id) && seen.insert(*j)
                        {
                            todo.push(*j);
                        }
                    }
                }
                reach = Some(seen);
            }
            // Who must hold it: with a reach, the nodes in it and every
            // daemon that is not a node; else everyone.
            let reached: Vec<usize>;
            let holders: &[usize] = match &reach {
                Some(r) => {
                    let mut h: Vec<usize> = r.iter().chain(&not_nodes).copied().collect();
                    h.sort_unstable();
                    reached = h;
                    &reached
                }
                None => &everyone,
            };
            let mut seen: Option<Vec<ChangeHash>> = None;
            for &i in holders {
                let n = &self.nodes[i];
                if n.core.is_none() || !wants(&self.trust, &n.identity.cert, id) {
                    continue;
                }
                let doc = n.core.as_ref().and_then(|c| c.doc(id));
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
        // A lost edit committed by nobody: it never left its writer.
        let lost: Vec<&ChangeHash> = self
            .lost
            .iter()
            .filter(|h| !self.committed.values().any(|s| s.contains(*h)))
            .collect();
        let sent_before_commit = self.lost.len() != lost.len()
            || live.iter().any(|n| {
                n.core.as_ref().is_some_and(|c| {
                    c.engine()
                        .docs()
                        .any(|d| lost.iter().any(|h| d.has_change(h)))
                })
            });
        let conflicts = live
            .first()
            .and_then(|n| n.core.as_ref())
            .map(|c| c.engine().docs().map(|d| d.conflicts().len()).sum())
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
        let rollouts = self.rollout_summaries();
        for e in &self.scenario.expect.rollouts {
            let Some(r) = rollouts.get(&e.app) else {
                failed.push(format!("no rollout of {}", e.app));
                continue;
            };
            if let Some(p) = &e.phase
                && *p != r.phase
            {
                failed.push(format!("rollout of {} is {}, expected {p}", e.app, r.phase));
            }
            if let Some(v) = &e.all_run
                && r.running.keys().any(|k| k != v)
            {
                failed.push(format!(
                    "nodes run {:?} of {}, expected all on {v}",
                    r.running, e.app
                ));
            }
            if let Some(n) = e.ran_bad_at_most
                && r.ran_bad > n
            {
                failed.push(format!(
                    "{} nodes ran a bad version of {}, expected at most {n}",
                    r.ran_bad, e.app
                ));
            }
            if let Some(n) = e.waves_open
                && r.waves_open != n
            {
                failed.push(format!(
                    "{} waves of {} open, expected {n}",
                    r.waves_open, e.app
                ));
            }
        }
        let mut links: BTreeMap<String, Traffic> = BTreeMap::new();
        let mut per_link: BTreeMap<String, Traffic> = BTreeMap::new();
        for (l, t) in &self.per_link {
            let link = &self.links[*l];
            let kind = links.entry(link.kind.clone()).or_default();
            kind.messages += t.messages;
            kind.bytes += t.bytes;
            let name = format!("{}<->{}", self.nodes[link.a].name, self.nodes[link.b].name);
            per_link.insert(name, t.clone());
        }
        Report {
            name: self.scenario.name.clone(),
            seed: self.scenario.seed,
            nodes: self.nodes.len(),
            virtual_seconds: self.scenario.duration.0.as_secs_f64(),
            events: self.events,
            heals,
            links,
            per_link,
            conflicts,
            security_events: self.security,
            uncommitted_lost: self.lost.len(),
            invariants: Invariants {
                converged,
                nothing_lost,
                no_forged_applied: no_forged,
                nothing_sent_before_commit: !sent_before_commit,
                failed,
            },
            agreement: self.agreement,
            rollouts,
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
