//! Staged rollouts (ADR 0011): an App's `spec.rollout` policy, the
//! rollout's state in the fleet document (`rollouts.<app>…`), which wave a
//! node belongs to, which spec it runs, and the anchors' gate. Pure: every
//! node and anchor computes the same from the same documents.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fleet::model::{
    AppSpec, FleetView, NodeReport, RuntimeKind, WorkloadReport, WorkloadState,
};
use crate::signed::doc::Document;

/// How an App's new versions reach the fleet: waves, a gate between them,
/// and what a failure does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPolicy {
    /// The waves, in order: by site or labels first, then percentages of
    /// the nodes those left (cumulative; the last is `percent: 100`).
    pub waves: Vec<Wave>,
    /// A wave's nodes must run the new version, healthy, this long before
    /// the next wave opens.
    #[serde(default = "default_healthy_for")]
    pub healthy_for_s: u64,
    /// Nodes of the open waves that may be failed or not yet healthy when
    /// the gate is judged: a count (`"2"`) or a share (`"10%"`).
    #[serde(default = "default_budget", deserialize_with = "budget")]
    pub max_failures: String,
    /// What more failures than that do.
    #[serde(default)]
    pub on_failure: OnFailure,
}

fn default_healthy_for() -> u64 {
    60
}

fn default_budget() -> String {
    "0".into()
}

/// Accepts `max_failures: 2` as well as `"2"` and `"10%"`.
fn budget<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        N(u64),
        S(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::N(n) => n.to_string(),
        Either::S(s) => s,
    })
}

/// One wave: exactly one of `sites`, `labels` or `percent`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// The nodes of these sites.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// The nodes with all these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// This share (cumulative, 1–100) of the nodes no site or label wave
    /// took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
}

/// What a failed gate does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// No further wave opens; nodes already updated keep the new version
    /// (unless it fails on them).
    #[default]
    Halt,
    /// Every node goes back to the version before.
    Rollback,
}

/// Checks a policy; the error names the field.
pub fn validate(p: &RolloutPolicy) -> Result<(), (String, String)> {
    if p.waves.is_empty() {
        return Err(("rollout.waves".into(), "needs at least one wave".into()));
    }
    let mut last_percent = 0;
    for (i, w) in p.waves.iter().enumerate() {
        let field = format!("rollout.waves[{i}]");
        let kinds = [
            !w.sites.is_empty(),
            !w.labels.is_empty(),
            w.percent.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err((
                field,
                "needs exactly one of sites, labels or percent".into(),
            ));
        }
        for s in &w.sites {
            crate::fleet::model::validate_name("site", s).map_err(|m| (field.clone(), m))?;
        }
        match w.percent {
            Some(p) if !(1..=100).contains(&p) => {
                return Err((field, format!("percent {p} is not between 1 and 100")));
            }
            Some(p) if p <= last_percent => {
                return Err((
                    field,
                    format!(
                        "percent {p} is not above the wave before ({last_percent}): percentages are cumulative"
                    ),
                ));
            }
            Some(p) => last_percent = p,
            None if last_percent > 0 => {
                return Err((
                    field,
                    "site and label waves come before percentage waves".into(),
                ));
            }
            None => {}
        }
    }
    if last_percent != 100 {
        return Err((
            "rollout.waves".into(),
            "the last wave must be percent: 100, so that every node is in one".into(),
        ));
    }
    if parse_budget(&p.max_failures).is_none() {
        return Err((
            "rollout.max_failures".into(),
            format!(
                "{:?} is neither a count nor a percentage like \"10%\"",
                p.max_failures
            ),
        ));
    }
    if p.healthy_for_s > 7 * 86_400 {
        return Err(("rollout.healthy_for_s".into(), "is more than a week".into()));
    }
    Ok(())
}

/// A failure budget: a count, or a share in percent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// At most this many.
    Count(u64),
    /// At most this share (0–100) of the nodes judged.
    Percent(u32),
}

/// Reads `"2"` or `"10%"`.
pub fn parse_budget(s: &str) -> Option<Budget> {
    let s = s.trim();
    if let Some(p) = s.strip_suffix('%') {
        let p: u32 = p.trim().parse().ok()?;
        (p <= 100).then_some(Budget::Percent(p))
    } else {
        s.parse().ok().map(Budget::Count)
    }
}

impl Budget {
    /// How many of `n` nodes may fail.
    pub fn of(&self, n: usize) -> usize {
        match *self {
            Budget::Count(c) => c.min(n as u64) as usize,
            Budget::Percent(p) => n * p as usize / 100,
        }
    }
}

/// The revision of an App spec: 16 hex digits of SHA-256 of the spec
/// without its rollout policy (changing only the policy starts nothing).
pub fn revision(spec: &AppSpec) -> String {
    let mut s = spec.clone();
    s.rollout = None;
    let bytes = serde_json::to_vec(&s).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..8])
}

/// Who decided what, when and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// When (seconds since the epoch, the writer's clock).
    pub at: i64,
    /// Who (the writer's name).
    pub by: String,
    /// Why.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// A rollout as the fleet document holds it, for its current revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RolloutState {
    /// The revision rolled out.
    pub revision: String,
    /// The App spec it replaces.
    pub from: Option<AppSpec>,
    /// Its revision.
    pub from_revision: Option<String>,
    /// Waves opened (wave 0 is open from the start), with the decision.
    pub opened: BTreeMap<usize, Mark>,
    /// The gate failed: no more waves.
    pub halted: Option<Mark>,
    /// An operator paused it: no more waves until resumed.
    pub paused: Option<Mark>,
    /// Aborted (by an operator, or a failed gate with `on_failure:
    /// rollback`): every node runs `from`.
    pub aborted: Option<Mark>,
    /// Every wave opened and the last gate held.
    pub done: Option<Mark>,
}

impl RolloutState {
    /// Is wave `i` open?
    pub fn is_open(&self, i: usize) -> bool {
        i == 0 || self.opened.contains_key(&i)
    }

    /// Still deciding (not done, not aborted).
    pub fn in_progress(&self) -> bool {
        self.done.is_none() && self.aborted.is_none() && self.from.is_some()
    }
}

/// The key prefix of an app's rollout.
pub fn key(app: &str) -> String {
    format!("rollouts.{app}")
}

/// Reads every app's rollout from the fleet document.
pub fn read_all(doc: &Document) -> BTreeMap<String, RolloutState> {
    let fields = doc.fields("rollouts.");
    let mut out = BTreeMap::new();
    for (k, v) in &fields {
        let app = &k["rollouts.".len()..];
        if app.contains('.') {
            continue;
        }
        let Ok(revision) = serde_json::from_str::<String>(v) else {
            continue;
        };
        let field = |name: &str| fields.get(&format!("{k}.{name}"));
        let mut state = RolloutState {
            from: field("from").and_then(|v| serde_json::from_str(v).ok()),
            from_revision: field("from_revision").and_then(|v| serde_json::from_str(v).ok()),
            revision: revision.clone(),
            ..RolloutState::default()
        };
        // Decisions: `<what>.<revision>[.<wave>].<writer>`, one key per
        // writer, so concurrent deciders never conflict; the earliest
        // counts.
        let keep = |slot: &mut Option<Mark>, m: Mark| {
            if slot.as_ref().is_none_or(|s| (m.at, &m.by) < (s.at, &s.by)) {
                *slot = Some(m);
            }
        };
        let prefix = format!("{k}.");
        for (key, v) in fields.range(prefix.clone()..) {
            let Some(rest) = key.strip_prefix(&prefix) else {
                break;
            };
            let parts: Vec<&str> = rest.split('.').collect();
            let Ok(mark) = serde_json::from_str::<Mark>(v) else {
                continue;
            };
            match parts.as_slice() {
                ["open", rev, wave, _] if *rev == revision => {
                    if let Ok(i) = wave.parse::<usize>() {
                        let mut slot = state.opened.remove(&i);
                        keep(&mut slot, mark);
                        if let Some(m) = slot {
                            state.opened.insert(i, m);
                        }
                    }
                }
                ["halted", rev, _] if *rev == revision => keep(&mut state.halted, mark),
                ["paused", rev, _] if *rev == revision => keep(&mut state.paused, mark),
                ["aborted", rev, _] if *rev == revision => keep(&mut state.aborted, mark),
                ["done", rev, _] if *rev == revision => keep(&mut state.done, mark),
                _ => {}
            }
        }
        out.insert(app.to_string(), state);
    }
    out
}

/// What an apply of App `app` with spec `new` adds to the fleet document
/// `doc`: when the App has a rollout policy and its revision changes, the
/// new rollout (its revision, and the spec it replaces); when it no longer
/// has one, the rollout goes. Empty otherwise.
pub fn plan_start(doc: &Document, app: &str, new: &AppSpec) -> BTreeMap<String, Option<String>> {
    let mut ops = BTreeMap::new();
    let base = key(app);
    let held: Vec<String> = doc
        .fields(&format!("{base}."))
        .into_keys()
        .chain(doc.raw(&base).map(|_| base.clone()))
        .collect();
    let clear = |ops: &mut BTreeMap<String, Option<String>>| {
        for k in &held {
            ops.insert(k.clone(), None);
        }
    };
    if new.rollout.is_none() {
        clear(&mut ops);
        return ops;
    }
    let rev = revision(new);
    let current: Option<AppSpec> = {
        let fields = doc.fields(&format!("apps.{app}."));
        let marker = doc.raw(&format!("apps.{app}"));
        marker.and_then(|_| {
            serde_json::from_value(crate::fleet::model::unflatten(
                &format!("apps.{app}"),
                &fields,
            ))
            .ok()
        })
    };
    let Some(current) = current else {
        // A new app: nothing to roll from; it goes everywhere at once.
        clear(&mut ops);
        return ops;
    };
    let state = read_all(doc).remove(app);
    if revision(&current) == rev || state.as_ref().is_some_and(|s| s.revision == rev) {
        return ops; // the same revision: nothing starts
    }
    // The new rollout starts from the last spec every node was given: the
    // current one if its own rollout finished (or it had none), else the
    // one that rollout started from — a halted, aborted or unfinished
    // rollout is not a version to fall back to.
    let current = match state {
        Some(s) if s.done.is_none() && s.revision == revision(&current) => {
            s.from.unwrap_or(current)
        }
        _ => current,
    };
    let from_rev = revision(&current);
    clear(&mut ops);
    if from_rev == rev {
        // Back to the spec every node was given (after an abort, say):
        // nothing to roll out.
        return ops;
    }
    ops.insert(base.clone(), Some(json(&rev)));
    ops.insert(
        format!("{base}.from"),
        Some(serde_json::to_string(&current).unwrap_or_default()),
    );
    ops.insert(format!("{base}.from_revision"), Some(json(&from_rev)));
    ops
}

fn json(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A decision about a rollout, as written into the fleet document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Open wave `i`.
    Open(usize),
    /// The gate failed: no more waves.
    Halt,
    /// The gate failed with `on_failure: rollback`, or an operator
    /// aborted: everyone back to `from`.
    Abort,
    /// Every wave is open and the last gate held.
    Done,
    /// An operator paused it.
    Pause,
    /// An operator resumed it (clears a pause and a halt).
    Resume,
}

/// The field writes of `decision` on `app`'s rollout of `revision` in the
/// fleet document `doc`, under the writer's own key.
pub fn decision_ops(
    doc: &Document,
    app: &str,
    revision: &str,
    decision: &Decision,
    mark: &Mark,
) -> BTreeMap<String, Option<String>> {
    let base = key(app);
    let by = crate::fleet::model::escape(&mark.by);
    let m = Some(serde_json::to_string(mark).unwrap_or_default());
    let mut ops = BTreeMap::new();
    let mut put = |what: String| {
        ops.insert(format!("{base}.{what}.{by}"), m.clone());
    };
    match decision {
        Decision::Open(i) => put(format!("open.{revision}.{i}")),
        Decision::Halt => put(format!("halted.{revision}")),
        Decision::Abort => put(format!("aborted.{revision}")),
        Decision::Done => put(format!("done.{revision}")),
        Decision::Pause => put(format!("paused.{revision}")),
        Decision::Resume => {
            // Every writer's pause and halt of this revision goes.
            for what in ["paused", "halted"] {
                let prefix = format!("{base}.{what}.{revision}.");
                for k in doc.fields(&prefix).into_keys() {
                    ops.insert(k, None);
                }
            }
        }
    }
    ops
}

/// A stable 64-bit score of a node for a rollout (FNV-1a, then a mixer):
/// cheap enough to rank 10,000 nodes in well under a millisecond.
fn score(app: &str, revision: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        app.as_bytes(),
        &[0],
        revision.as_bytes(),
        &[0],
        node.as_bytes(),
    ] {
        for b in part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Which wave each node the target spec places the app on belongs to.
pub fn waves(
    fleet: &FleetView,
    app: &str,
    target: &AppSpec,
    policy: &RolloutPolicy,
    revision: &str,
) -> HashMap<String, usize> {
    let placed = crate::fleet::placement::placed(fleet, app, target);
    let mut wave_of = HashMap::with_capacity(placed.len());
    let mut rest = Vec::new();
    for n in placed {
        let Some(spec) = fleet.nodes.get(&n) else {
            continue;
        };
        let by_selector = policy.waves.iter().position(|w| {
            (!w.sites.is_empty() && w.sites.contains(&spec.site))
                || (!w.labels.is_empty()
                    && w.labels.iter().all(|(k, v)| {
                        crate::fleet::placement::label(&n, spec, k) == Some(v.as_str())
                    }))
        });
        match by_selector {
            Some(i) => {
                wave_of.insert(n, i);
            }
            None => rest.push((score(app, revision, &n), n)),
        }
    }
    rest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let total = rest.len();
    let mut taken = 0;
    for (i, w) in policy.waves.iter().enumerate() {
        let Some(p) = w.percent else {
            continue;
        };
        let upto = (total * p as usize).div_ceil(100);
        for (_, n) in rest.iter().take(upto).skip(taken) {
            wave_of.insert(n.clone(), i);
        }
        taken = taken.max(upto);
    }
    wave_of
}

/// The wave of `node` in the rollout of `app` (`None`: the new revision
/// does not place the app on it). Ranks every node: callers that ask for
/// many nodes use [`waves`] once.
pub fn wave_of(fleet: &FleetView, app: &str, node: &str) -> Option<usize> {
    let target = fleet.apps.get(app)?;
    let policy = target.rollout.as_ref()?;
    let state = fleet.rollouts.get(app)?;
    waves(fleet, app, target, policy, &state.revision).remove(node)
}

/// Which spec of `app` a node runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The App as it is (no rollout of it is in progress, or the node's
    /// wave is open).
    Target,
    /// The spec the rollout replaces: the node's wave is not open, or the
    /// rollout was aborted, or the node rolled this revision back.
    From(Box<AppSpec>),
}

/// Which spec a node runs of every app under a rollout whose new revision
/// it does not run: `rolled_back` holds, per app, the revision the node
/// went back from; `wave_of` says the node's wave in an app's rollout
/// ([`wave_of`], or a cached copy of [`waves`]).
pub fn choices(
    fleet: &FleetView,
    rolled_back: &BTreeMap<String, String>,
    wave_of: &mut dyn FnMut(&str) -> Option<usize>,
) -> BTreeMap<String, Choice> {
    let mut out = BTreeMap::new();
    for (app, state) in &fleet.rollouts {
        let Some(target) = fleet.apps.get(app) else {
            continue;
        };
        let Some(from) = &state.from else {
            continue;
        };
        if revision(target) != state.revision || state.done.is_some() {
            continue;
        }
        let back = state.aborted.is_some()
            || rolled_back.get(app) == Some(&state.revision)
            || !wave_of(app).is_some_and(|w| state.is_open(w));
        if back {
            out.insert(app.clone(), Choice::From(Box::new(from.clone())));
        }
    }
    out
}

/// Why a workload that runs a rollout's new revision counts as failed on
/// its node, if it does: a native process that crashed a third time, or
/// failed its health check, or exited for good; a kube app the runtime
/// failed.
pub fn failure(spec: &AppSpec, r: &WorkloadReport) -> Option<String> {
    if r.state != WorkloadState::Failed {
        return None;
    }
    let reason = r.reason.clone().unwrap_or_else(|| "failed".into());
    let failed = match spec.runtime {
        RuntimeKind::Kube => true,
        RuntimeKind::Native => {
            let never = spec
                .native
                .as_ref()
                .is_some_and(|n| n.restart == crate::fleet::model::RestartPolicy::Never);
            r.restarts >= 2 || never || reason.starts_with(UNHEALTHY)
        }
    };
    failed.then(|| {
        if r.restarts >= 2 {
            format!("{reason} (after {} restarts)", r.restarts)
        } else {
            reason
        }
    })
}

/// How the native runtime's reason for a failed health check starts.
pub const UNHEALTHY: &str = "health check failed";

/// Where one node of a rollout stands, as an anchor judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStand {
    /// Its wave is not open.
    Waiting,
    /// It reports the new revision, not yet running (or not long enough).
    Updating,
    /// Running the new revision for the gate's duration.
    Healthy,
    /// Failed on the new revision, or rolled it back.
    Failed,
    /// No report of the new revision yet.
    Unreachable,
}

/// One wave's counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WaveStatus {
    /// Nodes in it.
    pub nodes: usize,
    /// Is it open?
    pub open: bool,
    /// Reporting the new revision.
    pub updated: usize,
    /// Healthy for the gate's duration.
    pub healthy: usize,
    /// Failed or rolled back.
    pub failed: usize,
    /// Not reporting the new revision.
    pub unreachable: usize,
    /// Why nodes failed (node → reason), at most 20.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, String>,
}

/// A rollout as an anchor sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RolloutStatus {
    /// The app.
    pub app: String,
    /// The revision rolled out, and its version.
    pub revision: String,
    /// Its version (`spec.version`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The version it replaces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    /// `rolling`, `paused`, `halted`, `aborted`, `done`.
    pub phase: String,
    /// Per wave.
    pub waves: Vec<WaveStatus>,
    /// The decisions, in order: what, when, by whom, why.
    pub decisions: Vec<(String, Mark)>,
    /// What the gate waits for now, in words.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub waiting_for: String,
}

/// The anchor's view of each node's health under a rollout: when it first
/// saw a node run the new revision (its own monotonic clock, ms), by app
/// and revision, then by node.
pub type Seen = HashMap<(String, String), HashMap<String, i64>>;

/// Judges `app`'s rollout: where each wave stands, and the decision the
/// gate makes now, if any. `seen` carries, across calls, when this anchor
/// first saw each node running the new revision; `now_ms` is its
/// monotonic clock (never a node's: node clocks are not trusted).
pub fn judge(
    fleet: &FleetView,
    app: &str,
    reports: &BTreeMap<String, NodeReport>,
    seen: &mut Seen,
    now_ms: i64,
) -> Option<(RolloutStatus, Option<(Decision, String)>)> {
    let state = fleet.rollouts.get(app)?;
    let target = fleet.apps.get(app)?;
    let policy = target.rollout.as_ref()?;
    let wave_of = waves(fleet, app, target, policy, &state.revision);
    judge_in_waves(fleet, app, &wave_of, reports, seen, now_ms)
}

/// [`judge`] with the rollout's waves ([`waves`]) computed by the caller
/// (an anchor keeps them per fleet heads instead of ranking every node on
/// every tick).
pub fn judge_in_waves(
    fleet: &FleetView,
    app: &str,
    wave_of: &HashMap<String, usize>,
    reports: &BTreeMap<String, NodeReport>,
    seen: &mut Seen,
    now_ms: i64,
) -> Option<(RolloutStatus, Option<(Decision, String)>)> {
    let state = fleet.rollouts.get(app)?;
    let target = fleet.apps.get(app)?;
    let policy = target.rollout.as_ref()?;
    if revision(target) != state.revision || state.from.is_none() {
        return None;
    }
    let rev = &state.revision;
    let seen = seen.entry((app.to_string(), rev.clone())).or_default();
    let mut status = RolloutStatus {
        app: app.to_string(),
        revision: rev.clone(),
        version: target.version.clone(),
        from_version: state.from.as_ref().and_then(|f| f.version.clone()),
        phase: state.phase().into(),
        waves: vec![WaveStatus::default(); policy.waves.len()],
        decisions: decisions(state),
        waiting_for: String::new(),
    };
    for (i, w) in status.waves.iter_mut().enumerate() {
        w.open = state.is_open(i) || state.done.is_some();
    }
    let mut earliest_healthy: Option<i64> = None;
    for (node, &w) in wave_of {
        let ws = &mut status.waves[w];
        ws.nodes += 1;
        if !ws.open {
            continue;
        }
        let report = reports.get(node);
        let rolled = report
            .and_then(|r| r.rollbacks.get(app))
            .filter(|b| b.revision == *rev);
        let wl = report.and_then(|r| r.workloads.get(app));
        let on_target = wl.is_some_and(|r| r.revision.as_deref() == Some(rev.as_str()));
        let stand = if let Some(b) = rolled {
            if ws.failures.len() < 20 {
                ws.failures
                    .insert(node.clone(), format!("rolled back: {}", b.reason));
            }
            NodeStand::Failed
        } else if on_target {
            let r = wl.cloned().unwrap_or_default();
            if let Some(why) = failure(target, &r) {
                if ws.failures.len() < 20 {
                    ws.failures.insert(node.clone(), why);
                }
                NodeStand::Failed
            } else if r.state == WorkloadState::Running {
                let since = match seen.get(node) {
                    Some(t) => *t,
                    None => {
                        seen.insert(node.clone(), now_ms);
                        now_ms
                    }
                };
                let healthy_for = policy.healthy_for_s as i64 * 1000;
                if now_ms - since >= healthy_for {
                    NodeStand::Healthy
                } else {
                    let at = since + healthy_for;
                    earliest_healthy = Some(earliest_healthy.map_or(at, |e| e.min(at)));
                    NodeStand::Updating
                }
            } else {
                seen.remove(node);
                NodeStand::Updating
            }
        } else {
            NodeStand::Unreachable
        };
        match stand {
            NodeStand::Healthy => {
                ws.updated += 1;
                ws.healthy += 1;
            }
            NodeStand::Updating => ws.updated += 1,
            NodeStand::Failed => ws.failed += 1,
            NodeStand::Unreachable => ws.unreachable += 1,
            NodeStand::Waiting => {}
        }
    }
    if !state.in_progress() {
        return Some((status, None));
    }
    // The gate over every open wave.
    let open: Vec<&WaveStatus> = status.waves.iter().filter(|w| w.open).collect();
    let judged: usize = open.iter().map(|w| w.nodes).sum();
    let failed: usize = open.iter().map(|w| w.failed).sum();
    let healthy: usize = open.iter().map(|w| w.healthy).sum();
    let allowed = parse_budget(&policy.max_failures)
        .unwrap_or(Budget::Count(0))
        .of(judged);
    let decision = if failed > allowed {
        if state.halted.is_some() {
            None
        } else {
            let names: Vec<String> = status
                .waves
                .iter()
                .flat_map(|w| w.failures.iter().map(|(n, r)| format!("{n}: {r}")))
                .take(3)
                .collect();
            let why = format!(
                "{failed} of {judged} nodes failed (at most {allowed} may): {}",
                names.join("; ")
            );
            Some(match policy.on_failure {
                OnFailure::Halt => (Decision::Halt, why),
                OnFailure::Rollback => (Decision::Abort, why),
            })
        }
    } else if state.halted.is_some() || state.paused.is_some() {
        None
    } else if judged.saturating_sub(healthy) <= allowed {
        let next = (0..status.waves.len()).find(|&i| !state.is_open(i));
        let why = format!(
            "{healthy} of {judged} nodes healthy for {} s ({failed} failed, at most {allowed} may)",
            policy.healthy_for_s
        );
        Some(match next {
            Some(i) => (Decision::Open(i), why),
            None => (Decision::Done, why),
        })
    } else {
        status.waiting_for = match earliest_healthy {
            Some(at) => format!(
                "{} of {judged} nodes healthy; the next may count in {} s",
                healthy,
                ((at - now_ms).max(0) + 999) / 1000
            ),
            None => format!("{healthy} of {judged} nodes healthy"),
        };
        None
    };
    Some((status, decision))
}

impl RolloutState {
    /// `rolling`, `paused`, `halted`, `aborted` or `done`.
    pub fn phase(&self) -> &'static str {
        if self.aborted.is_some() {
            "aborted"
        } else if self.done.is_some() {
            "done"
        } else if self.halted.is_some() {
            "halted"
        } else if self.paused.is_some() {
            "paused"
        } else {
            "rolling"
        }
    }
}

fn decisions(state: &RolloutState) -> Vec<(String, Mark)> {
    let mut d: Vec<(String, Mark)> = state
        .opened
        .iter()
        .map(|(i, m)| (format!("open wave {i}"), m.clone()))
        .collect();
    for (what, m) in [
        ("halt", &state.halted),
        ("pause", &state.paused),
        ("abort", &state.aborted),
        ("done", &state.done),
    ] {
        if let Some(m) = m {
            d.push((what.into(), m.clone()));
        }
    }
    d.sort_by(|a, b| a.1.at.cmp(&b.1.at).then(a.0.cmp(&b.0)));
    d
}
