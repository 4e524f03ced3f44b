//! An anchor's rollout gates (ADR 0011), sans IO: what it has seen of each
//! node under a rollout, judged once a tick into decisions the core writes.
//! Also the caches that keep rollouts cheap when many cores share a process
//! (the simulator): the fleet document read, and the waves, by the
//! document's heads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use automerge::ChangeHash;
use crdt_state::fleet::model::{FleetView, NodeReport};
use crdt_state::fleet::rollout::{self, Decision};
use crdt_state::{DocId, Document};

use crate::core::Now;

/// A decision an anchor's gate made, for the core to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateDecision {
    /// The app.
    pub app: String,
    /// The revision it is about.
    pub revision: String,
    /// What.
    pub decision: Decision,
    /// Why, in words.
    pub why: String,
    /// The version rolled out, for people.
    pub version: Option<String>,
}

impl GateDecision {
    /// In words: `web v4: wave 2 opened`.
    pub fn describe(&self) -> String {
        let what = match &self.decision {
            Decision::Open(i) => format!("wave {i} opened"),
            Decision::Halt => "halted".into(),
            Decision::Abort => "rolled back everywhere".into(),
            Decision::Done => "done".into(),
            Decision::Pause => "paused".into(),
            Decision::Resume => "resumed".into(),
        };
        match &self.version {
            Some(v) => format!("{} {v}: {what}", self.app),
            None => format!("{}: {what}", self.app),
        }
    }
}

/// What an anchor keeps between judgements.
#[derive(Default)]
pub struct Gates {
    /// When each node was first seen healthy on a revision (anchor clock).
    seen: rollout::Seen,
    /// Each node's latest report, and the epoch and heads of the document
    /// it was read from (read again only when they change).
    reports: BTreeMap<String, NodeReport>,
    read: HashMap<String, (u32, Vec<ChangeHash>)>,
}

impl Gates {
    /// Judges every rollout in progress in `fleet`, reading the nodes'
    /// reports from `docs`; returns the decisions to write.
    pub fn judge<'a>(
        &mut self,
        now: Now,
        fleet: &Document,
        docs: impl Iterator<Item = &'a Document>,
    ) -> Vec<GateDecision> {
        let states = rollout::read_all(fleet);
        if !states.values().any(rollout::RolloutState::in_progress) {
            self.seen.clear();
            return Vec::new();
        }
        for doc in docs {
            let DocId::Node { name, epoch } = doc.id() else {
                continue;
            };
            let heads = doc.heads();
            match self.read.get(name) {
                Some((e, h)) if (*e, h) == (*epoch, &heads) => continue,
                Some((e, _)) if *e > *epoch => continue,
                _ => {}
            }
            self.reports.insert(name.clone(), NodeReport::read(doc));
            self.read.insert(name.clone(), (*epoch, heads));
        }
        let view = fleet_view(fleet);
        let heads = fleet.heads();
        let reports = &self.reports;
        let mut out = Vec::new();
        for (app, state) in &states {
            if !state.in_progress() {
                continue;
            }
            let Some(waves) = waves_at(&heads, &view, app) else {
                continue;
            };
            if let Some((_, Some((decision, why)))) = rollout::judge_in_waves(
                &view,
                app,
                &waves,
                reports,
                &mut self.seen,
                now.mono_ms as i64,
            ) {
                out.push(GateDecision {
                    app: app.clone(),
                    revision: state.revision.clone(),
                    decision,
                    why,
                    version: view.apps.get(app).and_then(|a| a.version.clone()),
                });
            }
        }
        out
    }
}

impl Gates {
    /// `app`'s rollout now, with the health this anchor has watched (none,
    /// on a daemon that judges no gates).
    pub fn status<'a>(
        &self,
        now: Now,
        fleet: &Document,
        docs: impl Iterator<Item = &'a Document>,
        app: &str,
    ) -> Option<rollout::RolloutStatus> {
        let mut latest: HashMap<String, (u32, &Document)> = HashMap::new();
        for doc in docs {
            if let DocId::Node { name, epoch } = doc.id()
                && latest.get(name).is_none_or(|(e, _)| e < epoch)
            {
                latest.insert(name.clone(), (*epoch, doc));
            }
        }
        let reports = latest
            .into_iter()
            .map(|(n, (_, d))| (n, NodeReport::read(d)))
            .collect();
        let mut seen = self.seen.clone();
        rollout::judge(
            &fleet_view(fleet),
            app,
            &reports,
            &mut seen,
            now.mono_ms as i64,
        )
        .map(|(s, _)| s)
    }
}

/// Entries kept by each cache: a process holds one fleet document per
/// core; the simulator many cores, mostly at a few heads at a time.
const CACHED: usize = 8;

type Views = Vec<(Vec<ChangeHash>, Arc<FleetView>)>;
static VIEWS: Mutex<Views> = Mutex::new(Vec::new());

type Waves = Vec<(Vec<ChangeHash>, String, Arc<HashMap<String, usize>>)>;
static WAVES: Mutex<Waves> = Mutex::new(Vec::new());

fn sorted_heads(doc: &Document) -> Vec<ChangeHash> {
    let mut h = doc.heads();
    h.sort();
    h
}

/// The fleet document read, shared by every core at the same heads.
pub fn fleet_view(doc: &Document) -> Arc<FleetView> {
    let heads = sorted_heads(doc);
    if let Ok(v) = VIEWS.lock()
        && let Some((_, view)) = v.iter().find(|(h, _)| *h == heads)
    {
        return view.clone();
    }
    let view = Arc::new(FleetView::read(doc));
    if let Ok(mut v) = VIEWS.lock() {
        if v.len() >= CACHED {
            v.remove(0);
        }
        v.push((heads, view.clone()));
    }
    view
}

/// The wave of `node` in `app`'s rollout of the fleet document at `heads`
/// (see [`rollout::wave_of`]), the waves computed once per heads.
pub fn wave_of(heads: &[ChangeHash], fleet: &FleetView, app: &str, node: &str) -> Option<usize> {
    waves_at(heads, fleet, app)?.get(node).copied()
}

/// Every node's wave in `app`'s rollout of the fleet document at `heads`
/// ([`rollout::waves`]), computed once per heads.
pub fn waves_at(
    heads: &[ChangeHash],
    fleet: &FleetView,
    app: &str,
) -> Option<Arc<HashMap<String, usize>>> {
    let mut heads = heads.to_vec();
    heads.sort();
    if let Ok(w) = WAVES.lock()
        && let Some((_, _, waves)) = w.iter().find(|(h, a, _)| *h == heads && a == app)
    {
        return Some(waves.clone());
    }
    let target = fleet.apps.get(app)?;
    let policy = target.rollout.as_ref()?;
    let state = fleet.rollouts.get(app)?;
    let waves = Arc::new(rollout::waves(fleet, app, target, policy, &state.revision));
    if let Ok(mut w) = WAVES.lock() {
        if w.len() >= CACHED {
            w.remove(0);
        }
        w.push((heads, app.to_string(), waves.clone()));
    }
    Some(waves)
}
