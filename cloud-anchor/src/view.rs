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
use serde::{Deserialize, Serialize};

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
    /// The anchor that refused it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub anchor: String,
}

impl From<&AuditEntry> for SecurityEvent {
    fn from(e: &AuditEntry) -> SecurityEvent {
        SecurityEvent {
            at: e.at,
            source: e.subject.clone(),
            reason: e.text.clone(),
            anchor: e.anchor.clone(),
        }
    }
}

/// What an anchor holds of each anchor's audit entries: per log, the
/// highest number it has of each (replicas send each other what the other
/// lacks, `/shoal/audit/1`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditMarks {
    /// Timeline entries, per anchor.
    #[serde(default)]
    pub timeline: BTreeMap<String, u64>,
    /// Security log entries, per anchor.
    #[serde(default)]
    pub security: BTreeMap<String, u64>,
}

impl AuditMarks {
    fn of(&self, log: AuditLog) -> &BTreeMap<String, u64> {
        match log {
            AuditLog::Timeline => &self.timeline,
            AuditLog::Security => &self.security,
        }
    }

    fn of_mut(&mut self, log: AuditLog) -> &mut BTreeMap<String, u64> {
        match log {
            AuditLog::Timeline => &mut self.timeline,
            AuditLog::Security => &mut self.security,
        }
    }
}

/// One entry as replicas send it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentEntry {
    /// Its log.
    pub log: AuditLog,
    /// The entry.
    #[serde(flatten)]
    pub entry: AuditEntry,
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
    /// The certificates and revocations the daemon trusts (`None` before
    /// the first publish; its maps are shared, not copied).
    pub trust: Option<Trust>,
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
    security: VecDeque<AuditEntry>,
    security_total: u64,
    timeline: VecDeque<TimelineEvent>,
    /// The highest number held of each anchor's entries, per log.
    marks: AuditMarks,
    /// The certificates already noted on the timeline.
    certified: std::collections::HashSet<crdt_state::PublicKey>,
    /// Entries older than this many seconds are dropped (`None`: only the
    /// count limits).
    retention: Option<i64>,
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
            marks: AuditMarks::default(),
            retention: None,
            certified: std::collections::HashSet::new(),
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
        let entry = AuditEntry {
            at,
            subject: source.to_string(),
            text: reason.to_string(),
            ..Default::default()
        };
        self.record(AuditLog::Security, entry);
    }

    /// A timeline entry.
    pub fn event(&mut self, at: i64, kind: &str, subject: &str, text: String) {
        self.event_by(at, kind, subject, text, None, None);
    }

    /// A timeline entry that names who acted and from where.
    pub fn event_by(
        &mut self,
        at: i64,
        kind: &str,
        subject: &str,
        text: String,
        who: Option<String>,
        from: Option<String>,
    ) {
        let entry = TimelineEvent {
            at,
            kind: kind.to_string(),
            subject: subject.to_string(),
            text,
            who,
            from,
            ..Default::default()
        };
        self.record(AuditLog::Timeline, entry);
    }

    /// Numbers an entry of this anchor and keeps it.
    fn record(&mut self, log: AuditLog, mut entry: AuditEntry) {
        let n = self
            .marks
            .of_mut(log)
            .entry(self.anchor.clone())
            .or_insert(0);
        *n += 1;
        entry.id = *n;
        entry.anchor = self.anchor.clone();
        self.keep(log, entry);
    }

    fn log_mut(&mut self, log: AuditLog) -> &mut VecDeque<AuditEntry> {
        match log {
            AuditLog::Timeline => &mut self.timeline,
            AuditLog::Security => &mut self.security,
        }
    }

    /// Adds an entry in time order (one from another anchor may be older
    /// than the last held), within the log's limit, to be stored.
    fn keep(&mut self, log: AuditLog, entry: AuditEntry) {
        let max = match log {
            AuditLog::Timeline => TIMELINE_KEPT,
            AuditLog::Security => SECURITY_KEPT,
        };
        self.unsave(log, entry.clone());
        let list = self.log_mut(log);
        let at = list
            .iter()
            .rposition(|e| e.at <= entry.at)
            .map_or(0, |i| i + 1);
        list.insert(at, entry);
        if list.len() > max {
            list.pop_front();
        }
        self.changed.insert(match log {
            AuditLog::Timeline => "timeline",
            AuditLog::Security => "security",
        });
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
    /// Entries stored before they were numbered are this anchor's, and are
    /// numbered in their order.
    pub fn restore(&mut self, timeline: Vec<AuditEntry>, security: Vec<AuditEntry>) {
        for (log, entries, max) in [
            (AuditLog::Timeline, timeline, TIMELINE_KEPT),
            (AuditLog::Security, security, SECURITY_KEPT),
        ] {
            let skip = entries.len().saturating_sub(max);
            let mut kept = VecDeque::with_capacity(entries.len() - skip);
            for mut e in entries.into_iter().skip(skip) {
                if e.anchor.is_empty() || e.id == 0 {
                    e.anchor = self.anchor.clone();
                    e.id = self.marks.of(log).get(&self.anchor).copied().unwrap_or(0) + 1;
                }
                let mark = self.marks.of_mut(log).entry(e.anchor.clone()).or_insert(0);
                *mark = (*mark).max(e.id);
                kept.push_back(e);
            }
            *self.log_mut(log) = kept;
        }
        self.changed.insert("timeline");
        self.changed.insert("security");
    }

    /// Entries older than `seconds` are dropped from now on.
    pub fn set_retention(&mut self, seconds: Option<i64>) {
        self.retention = seconds;
    }

    /// Drops what is older than the retention (the store's copies are
    /// pruned by the daemon).
    pub fn expire(&mut self, now: i64) {
        let Some(keep) = self.retention else {
            return;
        };
        for log in [AuditLog::Timeline, AuditLog::Security] {
            // Kept in time order: the old ones are at the front.
            let list = self.log_mut(log);
            let before = list.len();
            while list.front().is_some_and(|e| e.at < now - keep) {
                list.pop_front();
            }
            if list.len() != before {
                self.changed.insert(match log {
                    AuditLog::Timeline => "timeline",
                    AuditLog::Security => "security",
                });
            }
        }
    }

    /// Certificates the fleet document brought since the last look go on
    /// the timeline: who was certified, as what, and by whom (the root, or
    /// an issuer against an operator's grant). The first look (at start)
    /// only takes note: what was certified before is not news.
    fn note_certificates(&mut self, trust: &Trust, now: i64) {
        let first = self.certified.is_empty();
        let new: Vec<&crdt_state::Certificate> = trust
            .certs()
            .filter(|c| !self.certified.contains(&c.key))
            .collect();
        let mut events = Vec::new();
        for c in new {
            self.certified.insert(c.key);
            if first {
                continue;
            }
            let site = c
                .site
                .as_deref()
                .map(|s| format!(" of site {s}"))
                .unwrap_or_default();
            let (by, who) = match (&c.via, &c.grant) {
                (Some(via), Some(g)) => (
                    format!("issuer {}, granted by {}", via.name, g.by.name),
                    Some(g.by.name.clone()),
                ),
                _ => ("the fleet root".to_string(), None),
            };
            events.push((
                c.name.clone(),
                format!("{} certified as {}{site} by {by}", c.name, c.role),
                who,
            ));
        }
        for (subject, text, who) in events {
            self.event_by(now, "certified", &subject, text, who, None);
        }
    }

    /// What this anchor holds of each anchor's entries.
    pub fn audit_marks(&self) -> AuditMarks {
        self.marks.clone()
    }

    /// The entries a replica holding `theirs` lacks, oldest first, as many
    /// as fit in `max_bytes` of JSON; and whether more remain.
    pub fn audit_since(&self, theirs: &AuditMarks, max_bytes: usize) -> (Vec<SentEntry>, bool) {
        let mut out = Vec::new();
        let mut size = 64;
        for (log, list) in [
            (AuditLog::Timeline, &self.timeline),
            (AuditLog::Security, &self.security),
        ] {
            let have = theirs.of(log);
            // Each anchor's in its own order, so a holder cut short by the
            // size still has no gap below its mark.
            let mut lacked: Vec<&AuditEntry> = list
                .iter()
                .filter(|e| e.id > have.get(&e.anchor).copied().unwrap_or(0))
                .collect();
            lacked.sort_by(|a, b| (&a.anchor, a.id).cmp(&(&b.anchor, b.id)));
            for e in lacked {
                let sent = SentEntry {
                    log,
                    entry: e.clone(),
                };
                let n = serde_json::to_vec(&sent).map_or(0, |v| v.len()) + 1;
                if size + n > max_bytes {
                    return (out, true);
                }
                size += n;
                out.push(sent);
            }
        }
        (out, false)
    }

    /// Entries another anchor sent: those not held yet are kept and
    /// stored. Returns how many were new.
    pub fn audit_merge(&mut self, entries: Vec<SentEntry>, now: i64) -> usize {
        let mut new = 0;
        for SentEntry { log, entry } in entries {
            if entry.anchor.is_empty() || entry.id == 0 {
                continue;
            }
            if self.retention.is_some_and(|keep| entry.at < now - keep) {
                continue;
            }
            let mark = self
                .marks
                .of_mut(log)
                .entry(entry.anchor.clone())
                .or_insert(0);
            if entry.id <= *mark {
                continue;
            }
            // Numbers arrive in order from each anchor (oldest first), so
            // the highest is all a holder needs to say.
            *mark = entry.id;
            if log == AuditLog::Security {
                self.security_total += 1;
            }
            self.keep(log, entry);
            new += 1;
        }
        new
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
                        self.note_certificates(trust, now);
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
            next.security = Arc::new(self.security.iter().map(SecurityEvent::from).collect());
        }
        next.security_total = self.security_total;
        if self.changed.contains("timeline") {
            next.timeline = Arc::new(self.timeline.iter().cloned().collect());
        }
        next.counters = self.counters.clone();
        next.trust = Some(trust.clone());
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
        let am = d.automerge();
        let missing = am.get_changes_meta(&known);
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

    /// Two replicas exchange their timeline and security entries: each
    /// ends with every entry once, named by the anchor that recorded it,
    /// in time order; a small answer size only splits the exchange.
    #[test]
    fn replicas_exchange_audit_entries_once_each() {
        let mut a = View::new("anchor-a");
        let mut b = View::new("anchor-b");
        for i in 0..30 {
            a.event(100 + i * 2, "edit", "fleet", format!("a{i}"));
        }
        b.event(101, "edit", "fleet", "b0".into());
        b.security(103, "10.0.0.9", "a wrong token");
        // B pulls from A in answers of at most 1 KiB.
        let mut rounds = 0;
        loop {
            rounds += 1;
            let (entries, more) = a.audit_since(&b.audit_marks(), 1024);
            assert!(!entries.is_empty() || !more);
            b.audit_merge(entries, 200);
            if !more {
                break;
            }
        }
        assert!(
            rounds > 2,
            "the size limit split the answer ({rounds} rounds)"
        );
        // And A from B, twice: the second brings nothing.
        let (entries, more) = b.audit_since(&a.audit_marks(), 1 << 20);
        assert!(!more);
        assert_eq!(a.audit_merge(entries, 200), 2, "b0 and the security entry");
        let (entries, _) = b.audit_since(&a.audit_marks(), 1 << 20);
        assert!(entries.is_empty(), "{entries:?}");
        for v in [&a, &b] {
            let texts: Vec<&str> = v.timeline.iter().map(|e| e.text.as_str()).collect();
            assert_eq!(texts.len(), 31, "{texts:?}");
            assert_eq!(&texts[..3], &["a0", "b0", "a1"], "in time order");
            assert!(v.timeline.iter().all(|e| e.id > 0 && !e.anchor.is_empty()));
            assert_eq!(v.security.len(), 1);
            assert_eq!(v.security[0].anchor, "anchor-b");
        }
        // What B took from A it also stores, numbered as A numbered it.
        let stored = b.take_unsaved();
        assert!(
            stored
                .iter()
                .any(|(l, e)| *l == AuditLog::Timeline && e.anchor == "anchor-a" && e.id == 30)
        );
        // B's own next entry goes on from its own numbers.
        b.event(300, "edit", "fleet", "b1".into());
        assert_eq!(
            b.timeline.back().map(|e| (e.anchor.as_str(), e.id)),
            Some(("anchor-b", 2))
        );
    }

    /// Entries stored before they were numbered become this anchor's, in
    /// order; retention drops old ones and refuses old ones from replicas.
    #[test]
    fn legacy_entries_are_numbered_and_retention_drops_the_old() {
        let mut v = View::new("anchor-a");
        let old = |at: i64| AuditEntry {
            at,
            kind: "edit".into(),
            subject: "fleet".into(),
            text: format!("t{at}"),
            ..Default::default()
        };
        v.restore(vec![old(10), old(20)], vec![old(15)]);
        assert_eq!(v.audit_marks().timeline.get("anchor-a"), Some(&2));
        assert_eq!(v.audit_marks().security.get("anchor-a"), Some(&1));
        v.event(30, "edit", "fleet", "t30".into());
        assert_eq!(v.timeline.back().map(|e| e.id), Some(3));
        v.set_retention(Some(100));
        v.expire(125);
        let left: Vec<i64> = v.timeline.iter().map(|e| e.at).collect();
        assert_eq!(left, vec![30], "older than 100 s dropped");
        let from_b = SentEntry {
            log: AuditLog::Timeline,
            entry: AuditEntry {
                anchor: "anchor-b".into(),
                id: 1,
                ..old(5)
            },
        };
        assert_eq!(v.audit_merge(vec![from_b], 125), 0, "too old to keep");
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
