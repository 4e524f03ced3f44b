//! The anchor's read model: what the API and the UI show, kept up to date
//! by the daemon that owns the documents and published as an immutable
//! [`Snapshot`] that request handlers read without touching the daemon.
//!
//! The daemon tells the [`View`] what changed (a document, a contact, a
//! security event, a timeline entry) and calls [`View::publish`] after each
//! turn of its loop; a new snapshot is built at most every
//! [`PUBLISH_EVERY`] and only when something changed. Parts that did not
//! change are shared with the previous snapshot (`Arc`), so a report from
//! one node costs one rebuild of the node list, not of everything.
//!
//! Cost with N nodes: the node list is rebuilt in O(N) per publish (10,000
//! rows: a few milliseconds); lag ("changes behind") is computed once per
//! distinct set of applied heads, not per node, and recomputed only when
//! the fleet or that site document changes.

use crdt_state::local::audit::{AuditEntry, AuditLog};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use crdt_state::fleet::model::{
    FleetView, NodeReport, SiteOverrideSpec, WorkloadReport, WorkloadState,
};
use crdt_state::local::datadir::{Conflict, conflicts_of};
use crdt_state::{DocId, Document, Trust};
use serde::Serialize;

/// Shortest time between two snapshots.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(200);
/// Security events kept in memory.
pub const SECURITY_KEPT: usize = 2_000;
/// Timeline entries kept in memory.
pub const TIMELINE_KEPT: usize = 10_000;

/// A node's state, as the overview colours it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Connected, everything applied, nothing failed.
    Ok,
    /// Connected but has not applied the latest desired state.
    Behind,
    /// Connected; a workload failed.
    Failed,
    /// Not connected to this anchor.
    Offline,
    /// Registered but never seen by this anchor.
    Unknown,
}

impl NodeState {
    /// Parses a filter value.
    pub fn parse(s: &str) -> Option<NodeState> {
        Some(match s {
            "ok" => NodeState::Ok,
            "behind" => NodeState::Behind,
            "failed" => NodeState::Failed,
            "offline" => NodeState::Offline,
            "unknown" => NodeState::Unknown,
            _ => return None,
        })
    }
}

/// One node, as the API lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeRow {
    /// Name.
    pub name: String,
    /// Site (empty for a node not in the registry).
    pub site: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// In the fleet's node registry.
    pub registered: bool,
    /// Connected to this anchor now.
    pub connected: bool,
    /// Last heard from (Unix seconds).
    pub last_contact: Option<i64>,
    /// Cut off from this anchor since (Unix seconds), when offline.
    pub offline_since: Option<i64>,
    /// Fleet and site changes it has not applied yet.
    pub behind: usize,
    /// Time of the oldest change it has not applied (Unix seconds).
    pub behind_since: Option<i64>,
    /// Its last reconcile (its own clock).
    pub reconciled_at: Option<i64>,
    /// What it runs.
    pub workloads: BTreeMap<String, WorkloadReport>,
    /// The peers it reported.
    pub peers: Vec<String>,
    /// Its devices, as it reported them.
    pub devices: BTreeMap<String, crdt_state::fleet::device::DeviceReport>,
    /// Its data waiting to go up, when that is a backlog.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uplink: Option<crdt_state::fleet::model::UplinkReport>,
    /// Summary state.
    pub state: NodeState,
}

/// One site, summed up.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SiteRow {
    /// Name.
    pub name: String,
    /// Nodes registered there.
    pub nodes: usize,
    /// Connected now.
    pub connected: usize,
    /// Not connected.
    pub offline: usize,
    /// With a failed workload.
    pub failed: usize,
    /// Behind the desired state.
    pub behind: usize,
    /// The most changes any of its nodes is behind.
    pub max_behind: usize,
    /// Earliest time one of its offline nodes was cut off.
    pub offline_since: Option<i64>,
    /// The site has overrides.
    pub has_overrides: bool,
}

/// A security event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SecurityEvent {
    /// When (Unix seconds).
    pub at: i64,
    /// Who (peer, node or API client).
    pub source: String,
    /// What was refused and why.
    pub reason: String,
}

/// A timeline entry: partitions, merges, edits, conflicts (`kind`:
/// `connected`, `disconnected`, `merged`, `edit`, `conflict`, `enrolled`,
/// …). The same value is what the store keeps.
pub type TimelineEvent = AuditEntry;

/// Counters for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counters {
    /// Sync bytes received.
    pub sync_bytes_in: u64,
    /// Sync bytes sent.
    pub sync_bytes_out: u64,
    /// Sync messages received.
    pub sync_messages_in: u64,
    /// Sync messages sent.
    pub sync_messages_out: u64,
    /// Size of the store file in bytes.
    pub store_bytes: u64,
    /// Documents held.
    pub documents: usize,
}

/// Everything the API serves, at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Increases with every publish.
    pub version: u64,
    /// What changed since the previous snapshot (`nodes`, `apps`, …).
    pub changed: Vec<&'static str>,
    /// Fleet name.
    pub fleet: String,
    /// This anchor's name.
    pub anchor: String,
    /// Nodes, by name.
    pub nodes: Arc<Vec<NodeRow>>,
    /// Sites, by name.
    pub sites: Arc<Vec<SiteRow>>,
    /// The fleet document, read: apps, configs, the node registry.
    pub spec: Arc<FleetView>,
    /// Site overrides.
    pub overrides: Arc<BTreeMap<String, SiteOverrideSpec>>,
    /// Conflicts in the fleet and site documents.
    pub conflicts: Arc<Vec<Conflict>>,
    /// Recent security events, newest last.
    pub security: Arc<Vec<SecurityEvent>>,
    /// Security events since start (also those no longer kept).
    pub security_total: u64,
    /// Recent timeline, newest last.
    pub timeline: Arc<Vec<TimelineEvent>>,
    /// Counters.
    pub counters: Counters,
    /// What each node holds of the artifacts its apps name (node →
    /// artifact → report).
    pub holdings: Arc<Holdings>,
}

pub use daemon::render::Holdings;

/// Lag of one node against one document: (changes behind, oldest time).
type Lag = (usize, Option<i64>);

/// The read model, owned by the daemon.
#[derive(Debug)]
pub struct View {
    anchor: String,
    version: u64,
    changed: BTreeSet<&'static str>,
    fleet: FleetView,
    reports: BTreeMap<String, NodeReport>,
    contacts: BTreeMap<String, (bool, Option<i64>, Option<i64>)>,
    overrides: BTreeMap<String, SiteOverrideSpec>,
    conflicts: BTreeMap<String, Vec<Conflict>>,
    security: VecDeque<SecurityEvent>,
    security_total: u64,
    timeline: VecDeque<TimelineEvent>,
    /// Timeline and security entries not yet in the store (bounded: the
    /// store keeps no more than the two logs' limits anyway).
    unsaved: VecDeque<(AuditLog, AuditEntry)>,
    lag_cache: HashMap<(DocId, Vec<String>), Lag>,
    docs_dirty: BTreeSet<DocId>,
    last_publish: Option<Instant>,
    /// Counters the daemon updates directly.
    pub counters: Counters,
    published: Arc<Snapshot>,
}

impl View {
    /// An empty view for the anchor named `anchor`.
    pub fn new(anchor: &str) -> View {
        View {
            anchor: anchor.to_string(),
            version: 0,
            changed: BTreeSet::new(),
            fleet: FleetView::default(),
            reports: BTreeMap::new(),
            contacts: BTreeMap::new(),
            overrides: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            security: VecDeque::new(),
            security_total: 0,
            timeline: VecDeque::new(),
            unsaved: VecDeque::new(),
            lag_cache: HashMap::new(),
            docs_dirty: BTreeSet::new(),
            last_publish: None,
            counters: Counters::default(),
            published: Arc::new(Snapshot::default()),
        }
    }

    /// A document changed (or appeared).
    pub fn doc_changed(&mut self, id: &DocId) {
        self.docs_dirty.insert(id.clone());
    }

    /// A node connected to or disconnected from this anchor.
    pub fn contact(&mut self, node: &str, connected: bool, at: i64) {
        let was = self.contacts.get(node).map(|c| c.0);
        let since = if connected {
            None
        } else if was == Some(false) {
            self.contacts.get(node).and_then(|c| c.2)
        } else {
            Some(at)
        };
        self.contacts
            .insert(node.to_string(), (connected, Some(at), since));
        self.changed.insert("nodes");
        if was != Some(connected) {
            let (kind, text) = if connected {
                ("connected", format!("{node} connected"))
            } else {
                ("disconnected", format!("{node} cut off"))
            };
            self.event(at, kind, node, text);
        }
    }

    /// A node was heard from (no state change).
    pub fn heard(&mut self, node: &str, at: i64) {
        if let Some(c) = self.contacts.get_mut(node) {
            c.1 = Some(at);
        }
    }

    /// A security event.
    pub fn security(&mut self, at: i64, source: &str, reason: &str) {
        self.security_total += 1;
        if self.security.len() == SECURITY_KEPT {
            self.security.pop_front();
        }
        self.security.push_back(SecurityEvent {
            at,
            source: source.to_string(),
            reason: reason.to_string(),
        });
        self.unsave(
            AuditLog::Security,
            AuditEntry {
                at,
                kind: String::new(),
                subject: source.to_string(),
                text: reason.to_string(),
            },
        );
        self.changed.insert("security");
    }

    /// The entries to store since the last call (the anchor appends them
    /// to its store: the timeline and security log survive a restart).
    pub fn take_unsaved(&mut self) -> Vec<(AuditLog, AuditEntry)> {
        self.unsaved.drain(..).collect()
    }

    fn unsave(&mut self, log: AuditLog, entry: AuditEntry) {
        if self.unsaved.len() >= TIMELINE_KEPT + SECURITY_KEPT {
            self.unsaved.pop_front();
        }
        self.unsaved.push_back((log, entry));
    }

    /// Puts back what the store kept, before anything new happens.
    pub fn restore(&mut self, timeline: Vec<AuditEntry>, security: Vec<AuditEntry>) {
        let keep = |n: usize, max: usize| n.saturating_sub(max);
        let skip = keep(timeline.len(), TIMELINE_KEPT);
        self.timeline = timeline.into_iter().skip(skip).collect();
        let skip = keep(security.len(), SECURITY_KEPT);
        self.security = security
            .into_iter()
            .skip(skip)
            .map(|e| SecurityEvent {
                at: e.at,
                source: e.subject,
                reason: e.text,
            })
            .collect();
        self.changed.insert("timeline");
        self.changed.insert("security");
    }

    /// A timeline entry.
    pub fn event(&mut self, at: i64, kind: &str, subject: &str, text: String) {
        if self.timeline.len() == TIMELINE_KEPT {
            self.timeline.pop_front();
        }
        let entry = TimelineEvent {
            at,
            kind: kind.to_string(),
            subject: subject.to_string(),
            text,
        };
        self.unsave(AuditLog::Timeline, entry.clone());
        self.timeline.push_back(entry);
        self.changed.insert("timeline");
    }

    /// Each node's latest report, as of the last publish.
    pub fn reports(&self) -> &BTreeMap<String, NodeReport> {
        &self.reports
    }

    /// The last published snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.published.clone()
    }

    /// Builds a new snapshot if something changed and the last one is at
    /// least [`PUBLISH_EVERY`] old (`force`: regardless of age). `doc`
    /// looks documents up in the daemon's engine.
    pub fn publish<'a>(
        &mut self,
        doc: &dyn Fn(&DocId) -> Option<&'a Document>,
        docs: &mut dyn Iterator<Item = &'a Document>,
        trust: &Trust,
        now: i64,
        force: bool,
    ) -> Option<Arc<Snapshot>> {
        if self.changed.is_empty() && self.docs_dirty.is_empty() && self.version > 0 {
            return None;
        }
        if !force
            && self.version > 0
            && self
                .last_publish
                .is_some_and(|t| t.elapsed() < PUBLISH_EVERY)
        {
            return None;
        }
        if self.version == 0 {
            // First publish: read everything the engine holds.
            for d in docs {
                self.docs_dirty.insert(d.id().clone());
            }
        }
        let dirty = std::mem::take(&mut self.docs_dirty);
        let mut latest_node_docs: BTreeMap<String, (u32, DocId)> = BTreeMap::new();
        for id in &dirty {
            match id {
                DocId::Fleet => {
                    if let Some(d) = doc(id) {
                        let f = FleetView::read(d);
                        if f.apps != self.fleet.apps {
                            self.changed.insert("apps");
                        }
                        if f.configs != self.fleet.configs {
                            self.changed.insert("configs");
                        }
                        self.fleet = f;
                        self.changed.insert("fleet");
                        self.set_conflicts(d, trust, now);
                    }
                    self.lag_cache.retain(|(k, _), _| *k != DocId::Fleet);
                    self.changed.insert("nodes");
                }
                DocId::Site(name) => {
                    if let Some(d) = doc(id) {
                        self.overrides
                            .insert(name.clone(), crdt_state::fleet::model::read_site(d));
                        self.set_conflicts(d, trust, now);
                    }
                    self.lag_cache.retain(|(k, _), _| k != id);
                    self.changed.insert("overrides");
                    self.changed.insert("nodes");
                }
                DocId::Node { name, epoch } => {
                    let e = latest_node_docs
                        .entry(name.clone())
                        .or_insert((*epoch, id.clone()));
                    if *epoch >= e.0 {
                        *e = (*epoch, id.clone());
                    }
                }
            }
        }
        for (name, (_, id)) in latest_node_docs {
            if let Some(d) = doc(&id) {
                let r = NodeReport::read(d);
                // Security events the node saw that this view has not
                // logged yet (all of them, after the anchor restarted).
                let seen = self
                    .reports
                    .get(&name)
                    .map(|o| o.security.as_slice())
                    .unwrap_or_default();
                let new: Vec<_> = r
                    .security
                    .iter()
                    .filter(|e| !seen.contains(e))
                    .cloned()
                    .collect();
                for e in new {
                    self.security(e.at, &format!("{} (seen by {name})", e.who), &e.reason);
                }
                let before = self.reports.get(&name).map(|o| &o.artifacts);
                if before != Some(&r.artifacts) && (before.is_some() || !r.artifacts.is_empty()) {
                    self.changed.insert("artifacts");
                }
                // A report from an older epoch than the one held is ignored.
                self.reports.insert(name, r);
                self.changed.insert("nodes");
            }
        }
        let mut next = Snapshot {
            version: self.version + 1,
            changed: self.changed.iter().copied().collect(),
            fleet: self.fleet.name.clone(),
            anchor: self.anchor.clone(),
            ..(*self.published).clone()
        };
        if self.changed.contains("nodes") {
            let (nodes, sites) = self.rows(doc);
            next.nodes = Arc::new(nodes);
            next.sites = Arc::new(sites);
        }
        if self.changed.contains("fleet") {
            next.spec = Arc::new(self.fleet.clone());
        }
        if self.changed.contains("overrides") {
            next.overrides = Arc::new(self.overrides.clone());
        }
        if self.changed.contains("artifacts") {
            next.holdings = Arc::new(daemon::render::holdings(&self.reports));
        }
        if self.changed.contains("conflicts") || self.version == 0 {
            next.conflicts = Arc::new(self.conflicts.values().flatten().cloned().collect());
        }
        if self.changed.contains("security") {
            next.security = Arc::new(self.security.iter().cloned().collect());
        }
        next.security_total = self.security_total;
        if self.changed.contains("timeline") {
            next.timeline = Arc::new(self.timeline.iter().cloned().collect());
        }
        next.counters = self.counters.clone();
        self.changed.clear();
        self.version += 1;
        self.last_publish = Some(Instant::now());
        self.published = Arc::new(next);
        Some(self.published.clone())
    }

    fn set_conflicts(&mut self, d: &Document, trust: &Trust, now: i64) {
        let c = conflicts_of(d, trust);
        let key = d.id().to_string();
        let old: Vec<String> = self
            .conflicts
            .get(&key)
            .map(|v| v.iter().map(|o| o.field.clone()).collect())
            .unwrap_or_default();
        for n in &c {
            if !old.contains(&n.field) {
                let values: Vec<String> = n
                    .values
                    .iter()
                    .map(|v| format!("{} by {}", v.value, v.writer))
                    .collect();
                self.event(
                    now,
                    "conflict",
                    &key,
                    format!(
                        "concurrent edits of {} in {key}: {}",
                        n.field,
                        values.join(" vs ")
                    ),
                );
            }
        }
        if c.is_empty() {
            self.conflicts.remove(&key);
        } else {
            self.conflicts.insert(key, c);
        }
        self.changed.insert("conflicts");
    }

    fn lag(
        cache: &mut HashMap<(DocId, Vec<String>), Lag>,
        d: Option<&Document>,
        heads: &[String],
    ) -> Lag {
        let Some(d) = d else { return (0, None) };
        let key = (d.id().clone(), heads.to_vec());
        if let Some(l) = cache.get(&key) {
            return *l;
        }
        let known: Vec<ChangeHash> = heads
            .iter()
            .filter_map(|h| h.parse::<ChangeHash>().ok())
            .filter(|h| d.has_change(h))
            .collect();
        let missing = d.automerge().get_changes_meta(&known);
        let lag = (
            missing.len(),
            missing.iter().map(|m| m.timestamp).filter(|t| *t > 0).min(),
        );
        cache.insert(key, lag);
        lag
    }

    fn rows<'a>(
        &mut self,
        doc: &dyn Fn(&DocId) -> Option<&'a Document>,
    ) -> (Vec<NodeRow>, Vec<SiteRow>) {
        let mut names: BTreeSet<String> = self.fleet.nodes.keys().cloned().collect();
        names.extend(self.reports.keys().cloned());
        let fleet_doc = doc(&DocId::Fleet);
        let mut nodes = Vec::with_capacity(names.len());
        let mut sites: BTreeMap<String, SiteRow> = BTreeMap::new();
        for name in names {
            let spec = self.fleet.nodes.get(&name);
            let site = spec.map(|s| s.site.clone()).unwrap_or_default();
            let report = self.reports.get(&name).cloned();
            let contact = self.contacts.get(&name).copied();
            let (connected, last_contact, offline_since) = contact.unwrap_or((false, None, None));
            let (mut behind, mut behind_since) = (0, None);
            if let Some(r) = &report {
                let (n, t) = Self::lag(&mut self.lag_cache, fleet_doc, &r.fleet_heads);
                let site_doc = doc(&DocId::Site(site.clone()));
                let (m, u) = if site.is_empty() {
                    (0, None)
                } else {
                    Self::lag(&mut self.lag_cache, site_doc, &r.site_heads)
                };
                behind = n + m;
                behind_since = [t, u].into_iter().flatten().min();
            }
            let failed = report.as_ref().is_some_and(|r| {
                r.workloads
                    .values()
                    .any(|w| w.state == WorkloadState::Failed)
            });
            let state = if contact.is_none() {
                NodeState::Unknown
            } else if !connected {
                NodeState::Offline
            } else if failed {
                NodeState::Failed
            } else if behind > 0 {
                NodeState::Behind
            } else {
                NodeState::Ok
            };
            if spec.is_some() {
                let s = sites.entry(site.clone()).or_insert_with(|| SiteRow {
                    name: site.clone(),
                    ..SiteRow::default()
                });
                s.nodes += 1;
                match state {
                    NodeState::Offline | NodeState::Unknown => {
                        s.offline += 1;
                        s.offline_since = match (s.offline_since, offline_since) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    NodeState::Failed => s.failed += 1,
                    NodeState::Behind => s.behind += 1,
                    NodeState::Ok => {}
                }
                if connected {
                    s.connected += 1;
                }
                s.max_behind = s.max_behind.max(behind);
            }
            nodes.push(NodeRow {
                name,
                site,
                labels: spec.map(|s| s.labels.clone()).unwrap_or_default(),
                registered: spec.is_some(),
                connected,
                last_contact,
                offline_since: if connected { None } else { offline_since },
                behind,
                behind_since,
                reconciled_at: report.as_ref().map(|r| r.reconciled_at),
                workloads: report
                    .as_ref()
                    .map(|r| r.workloads.clone())
                    .unwrap_or_default(),
                devices: report
                    .as_ref()
                    .map(|r| r.devices.clone())
                    .unwrap_or_default(),
                uplink: report.as_ref().and_then(|r| r.uplink.clone()),
                peers: report.map(|r| r.peers).unwrap_or_default(),
                state,
            });
        }
        for (name, _) in self.overrides.iter() {
            sites
                .entry(name.clone())
                .or_insert_with(|| SiteRow {
                    name: name.clone(),
                    ..SiteRow::default()
                })
                .has_overrides = true;
        }
        for s in sites.values_mut() {
            s.has_overrides = self
                .overrides
                .get(&s.name)
                .is_some_and(|o| !o.apps.is_empty() || !o.configs.is_empty());
        }
        (nodes, sites.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdt_state::fleet::model::NodeReport;
    use crdt_state::{DataDir, Role, fleet::manifest};
    use std::collections::HashMap;

    fn heads(d: &Document) -> Vec<String> {
        d.heads().iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn rows_carry_state_lag_and_site_totals() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dd = DataDir::init(tmp.path(), "f", 1).unwrap();
        let nodes = "apiVersion: shoal.dev/v1\nkind: Node\nmetadata: {name: n1}\nspec: {site: s1}\n---\napiVersion: shoal.dev/v1\nkind: Node\nmetadata: {name: n2}\nspec: {site: s1, labels: {rack: r2}}\n";
        dd.apply(&manifest::parse("n", nodes).unwrap(), 2).unwrap();
        let old = heads(&dd.doc(&DocId::Fleet).unwrap());
        let cfg =
            "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {name: c}\nspec: {data: {k: v}}\n";
        dd.apply(&manifest::parse("c", cfg).unwrap(), 3).unwrap();
        let current = heads(&dd.doc(&DocId::Fleet).unwrap());
        let mut docs: HashMap<DocId, Document> = HashMap::new();
        for (name, applied) in [("n1", current.clone()), ("n2", old.clone())] {
            let id = dd.create_identity(Role::Node, Some("s1"), name, 4).unwrap();
            let mut d = Document::new(DocId::Node {
                name: name.into(),
                epoch: 0,
            });
            let r = NodeReport {
                fleet_heads: applied,
                ..NodeReport::default()
            };
            let ops = r.ops(&d);
            d.edit(&id, 5, &ops).unwrap().unwrap();
            docs.insert(d.id().clone(), d);
        }
        // The fleet document now also holds the two certificates.
        let fleet = dd.doc(&DocId::Fleet).unwrap();
        docs.insert(DocId::Fleet, fleet);
        let mut view = View::new("a");
        view.contact("n1", true, 10);
        view.contact("n2", true, 11);
        view.contact("n2", false, 20);
        let snap = {
            let lookup = |id: &DocId| docs.get(id);
            view.publish(&lookup, &mut docs.values(), dd.trust(), 30, true)
                .unwrap()
        };
        let n1 = snap.nodes.iter().find(|n| n.name == "n1").unwrap();
        let n2 = snap.nodes.iter().find(|n| n.name == "n2").unwrap();
        // Lag counts the fleet changes a node's applied heads do not
        // cover: for n1 the two certificates published after it applied,
        // for n2 those and the Config.
        assert_eq!(n1.behind, 2);
        assert_eq!(n2.behind, 3);
        assert!(n1.behind_since.is_some());
        assert_eq!(n2.state, NodeState::Offline);
        assert_eq!(n2.offline_since, Some(20));
        assert_eq!(n1.offline_since, None);
        assert_eq!(n2.labels.get("rack").map(String::as_str), Some("r2"));
        let s1 = snap.sites.iter().find(|s| s.name == "s1").unwrap();
        assert_eq!((s1.nodes, s1.connected, s1.offline), (2, 1, 1));
        assert_eq!(s1.max_behind, n2.behind);
        assert_eq!(s1.offline_since, Some(20));
        assert!(
            snap.timeline
                .iter()
                .any(|e| e.kind == "disconnected" && e.subject == "n2")
        );
        assert_eq!(snap.spec.configs.len(), 1);
        // Nothing changed: no new snapshot.
        let lookup = |id: &DocId| docs.get(id);
        assert!(
            view.publish(&lookup, &mut docs.values(), dd.trust(), 31, true)
                .is_none()
        );
        // A reconnect is a change.
        view.contact("n2", true, 40);
        let snap = view
            .publish(&lookup, &mut docs.values(), dd.trust(), 41, true)
            .unwrap();
        let n2 = snap.nodes.iter().find(|n| n.name == "n2").unwrap();
        assert!(n2.connected);
        assert_eq!(n2.state, NodeState::Behind);
    }

    /// A node's reported security events reach the anchor's log once each,
    /// as the reports that carry them change; an anchor that starts anew
    /// logs what the reports still hold.
    #[test]
    fn security_events_a_node_reports_reach_the_log_once() {
        use crdt_state::fleet::model::SecurityReport;
        let tmp = tempfile::tempdir().unwrap();
        let mut dd = DataDir::init(tmp.path(), "f", 1).unwrap();
        let id = dd.create_identity(Role::Node, Some("s1"), "n1", 2).unwrap();
        let doc_id = DocId::Node {
            name: "n1".into(),
            epoch: 0,
        };
        let event = |at: i64, who: &str| SecurityReport {
            at,
            who: who.into(),
            reason: "group 40 does not match its hash".into(),
        };
        let mut docs: HashMap<DocId, Document> = HashMap::new();
        docs.insert(DocId::Fleet, dd.doc(&DocId::Fleet).unwrap());
        docs.insert(doc_id.clone(), Document::new(doc_id.clone()));
        let write = |docs: &mut HashMap<DocId, Document>, security: Vec<SecurityReport>, t: i64| {
            let d = docs.get_mut(&doc_id).unwrap();
            let r = NodeReport {
                security,
                ..NodeReport::default()
            };
            let ops = r.ops(d);
            d.edit(&id, t, &ops).unwrap();
        };
        let logged = |view: &mut View, docs: &HashMap<DocId, Document>, now: i64| {
            view.doc_changed(&doc_id);
            let lookup = |id: &DocId| docs.get(id);
            view.publish(&lookup, &mut docs.values(), dd.trust(), now, true);
            view.current()
                .security
                .iter()
                .map(|e| format!("{} {}", e.at, e.source))
                .collect::<Vec<_>>()
        };
        write(
            &mut docs,
            vec![event(10, "n2 (p2)"), event(11, "n3 (p3)")],
            3,
        );
        let mut view = View::new("a");
        assert_eq!(
            logged(&mut view, &docs, 20),
            ["10 n2 (p2) (seen by n1)", "11 n3 (p3) (seen by n1)"]
        );
        // The report moves on: the oldest dropped, one new.
        write(
            &mut docs,
            vec![event(11, "n3 (p3)"), event(12, "n4 (p4)")],
            4,
        );
        assert_eq!(
            logged(&mut view, &docs, 21),
            [
                "10 n2 (p2) (seen by n1)",
                "11 n3 (p3) (seen by n1)",
                "12 n4 (p4) (seen by n1)"
            ]
        );
        assert_eq!(view.current().security_total, 3);
        // A new view (the anchor restarted) logs what the report holds.
        let mut fresh = View::new("a");
        assert_eq!(logged(&mut fresh, &docs, 22).len(), 2);
    }
}
