//! The typed fleet model over the flat documents.
//!
//! | document | keys |
//! |---|---|
//! | `fleet` | `fleet.name`, `apps.<app>…`, `configs.<cfg>…`, `nodes.<node>…`, `certs.<key>`, `revoked.<key>` |
//! | `site/<s>` | `apps.<app>.paused / version / env.<K>`, `configs.<cfg>.data.<k>` |
//! | `node/<n>/<e>` | `report.*` (applied heads, workloads) |
//!
//! An entity (`apps.inspect`) exists while its marker key is present; its
//! fields are the keys below it. Deleting an entity deletes the marker and
//! every field, so an edit made concurrently on a partitioned copy leaves
//! only an orphan field that readers ignore and the next apply removes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::signed::doc::Document;

/// Checks a DNS-label style name: 1–63 of `a-z 0-9 -`, starting and ending
/// with a letter or digit.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} is not a valid name: expected 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"
        ))
    }
}

/// Escapes a free-form key component (`.` and `%`) for the flat key space.
pub fn escape(component: &str) -> String {
    let mut out = String::with_capacity(component.len());
    for ch in component.chars() {
        match ch {
            '%' => out.push_str("%25"),
            '.' => out.push_str("%2E"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`escape`].
pub fn unescape(component: &str) -> String {
    component.replace("%2E", ".").replace("%25", "%")
}

/// Flattens a JSON object into `prefix.key.key = json` leaves. Nulls are
/// left out; arrays and scalars are leaves.
pub fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}.{}", escape(k)), v, out);
            }
        }
        Value::Null => {}
        leaf => {
            out.insert(prefix.to_string(), leaf.to_string());
        }
    }
}

/// Rebuilds a JSON object from the leaves below `prefix.`.
pub fn unflatten(prefix: &str, fields: &BTreeMap<String, String>) -> Value {
    let mut root = serde_json::Map::new();
    let dotted = format!("{prefix}.");
    // Only the keys under the prefix, found in the sorted map: reading
    // every entity of a kind stays linear in the fields (a scan of all of
    // them per entity made reading 10,000 nodes quadratic).
    let under = fields
        .range::<str, _>((
            std::ops::Bound::Included(dotted.as_str()),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(k, _)| k.starts_with(&dotted));
    for (k, text) in under {
        let Some(rest) = k.strip_prefix(&dotted) else {
            continue;
        };
        let Ok(leaf) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        let parts: Vec<String> = rest.split('.').map(unescape).collect();
        let mut cur = &mut root;
        for (i, p) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                cur.insert(p.clone(), leaf.clone());
                break;
            }
            let entry = cur
                .entry(p.clone())
                .or_insert_with(|| Value::Object(Default::default()));
            if !entry.is_object() {
                *entry = Value::Object(Default::default());
            }
            let Value::Object(next) = entry else { break };
            cur = next;
        }
    }
    Value::Object(root)
}

/// Which runtime applies an app.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// The process supervisor (embedded default).
    #[default]
    Native,
    /// Kubernetes manifests applied to the local K3s.
    Kube,
}

/// How a native process is restarted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Always restart, with backoff.
    #[default]
    Always,
    /// Restart only after a non-zero exit.
    OnFailure,
    /// Never restart.
    Never,
}

/// A file rendered into the app's directory from a Config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    /// The Config to render.
    pub config: String,
    /// One key of the Config; without it the file holds every `key=value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// How to run a native app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeSpec {
    /// Program and arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Files rendered from Configs, by path relative to the app directory.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, FileSource>,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Health check; a process that fails it is restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Keep the process running when the node daemon stops (a protection
    /// relay that must not blink during a node upgrade); the next start of
    /// the node adopts it if its spec is unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outlive_node: bool,
}

/// A health check of a native app: exactly one of `http`, `tcp`, `exec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// GET this URL (`http://host:port/path`); healthy on a 2xx answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Connect to `host:port`; healthy when it accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// Run this command in the app's directory; healthy on exit 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    /// Seconds between checks.
    #[serde(default = "default_period")]
    pub period_s: u64,
    /// Seconds one check may take.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Consecutive failures that make the app unhealthy.
    #[serde(default = "default_failures")]
    pub failures: u32,
}

fn default_period() -> u64 {
    5
}
fn default_timeout() -> u64 {
    2
}
fn default_failures() -> u32 {
    3
}

/// How to run a kube app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeSpec {
    /// Namespace Shoal owns for this app (default `shoal-<app>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Kubernetes manifests, several separated by `---`.
    #[serde(default)]
    pub manifests: String,
    /// May the app's manifests hold cluster-scoped objects (a CRD's
    /// cluster-scoped kind, an IngressClass)? Off by default: an app lives
    /// in its namespace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_cluster_scoped: bool,
}

/// An app: what runs where.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    /// `native` (default) or `kube`.
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// Label selector (all must match); `site` and `node` are implicit labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Run on at most this many matching nodes (rendezvous hashing); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Version or image tag, for people and for site rollbacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Native runtime settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<NativeSpec>,
    /// Kube runtime settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube: Option<KubeSpec>,
    /// Artifacts the app reads: its own name for each → the Artifact's name
    /// (`model: model-v3`). The app runs only once every one is whole.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifacts: BTreeMap<String, String>,
    /// How a new revision reaches the nodes: waves and gates (ADR 0011).
    /// Without it, a change goes everywhere at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::fleet::rollout::RolloutPolicy>,
}

/// A large file (an AI model, firmware, a dataset) carried to the nodes
/// whose apps name it: its bytes travel as a blob, verified against `hash`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ArtifactSpec {
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 hash of the bytes (64 lowercase hex digits).
    pub hash: String,
    /// Media type, for people and apps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// What it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A config: named key/value data rendered into files or env.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// The values.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

/// A node registry entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// The node's site.
    pub site: String,
    /// Labels for selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A site's override of one app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppOverride {
    /// Stop the app at this site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Run this version instead (a rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Environment values on top of the app's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// A site's override of one config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigOverride {
    /// Values on top of the config's.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

/// Everything a site overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteOverrideSpec {
    /// Per app.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub apps: BTreeMap<String, AppOverride>,
    /// Per config.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub configs: BTreeMap<String, ConfigOverride>,
    /// Per device: setpoints.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, crate::fleet::device::DeviceOverride>,
}

/// Where a workload stands on its node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadState {
    /// Desired but not started yet.
    #[default]
    Pending,
    /// Running (and healthy, where a health check is set).
    Running,
    /// Failed; `reason` says why.
    Failed,
    /// Stopped on purpose (paused at the site, or removed).
    Stopped,
    /// The runtime cannot tell now (its API server is unreachable); the
    /// workload probably still runs. `reason` says since when and what was
    /// last known.
    Unknown,
}

/// One workload as its node reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadReport {
    /// State.
    pub state: WorkloadState,
    /// Why it failed, in words an operator can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Restarts since the node started it with this spec.
    #[serde(default)]
    pub restarts: u32,
    /// The version it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The revision of the App spec the node runs it from
    /// ([`crate::fleet::rollout::revision`]): what a rollout's gate counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

/// What a node reports in its own document (`node/<name>/<epoch>`).
/// Written only when something an operator cares about changes: heartbeats
/// and live metrics stay out of the CRDT.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeReport {
    /// Heads (hex) of the fleet document the node last applied.
    #[serde(default)]
    pub fleet_heads: Vec<String>,
    /// Heads (hex) of its site document it last applied.
    #[serde(default)]
    pub site_heads: Vec<String>,
    /// Per app.
    #[serde(default)]
    pub workloads: BTreeMap<String, WorkloadReport>,
    /// When the last reconcile finished (seconds since the epoch, the node's clock; informational).
    #[serde(default)]
    pub reconciled_at: i64,
    /// The peers it is connected to (names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Its devices.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, crate::fleet::device::DeviceReport>,
    /// The artifacts its apps name (by artifact name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifacts: BTreeMap<String, ArtifactReport>,
    /// Its latest security events, oldest first (at most
    /// [`SECURITY_REPORTED`]): what it refused and whom it cut off, so that
    /// the anchor's security log shows what the edge saw.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security: Vec<SecurityReport>,
    /// Its data not yet acknowledged by an anchor, when that is a backlog
    /// (the oldest record waiting is older than
    /// [`UPLINK_BACKLOG_AFTER_MS`]); absent when it keeps up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<UplinkReport>,
    /// Apps whose rollout the node rolled back on its own (by app).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollbacks: BTreeMap<String, RollbackReport>,
}

/// A node went back from a rollout's new revision on its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackReport {
    /// The revision it left.
    pub revision: String,
    /// Why (the app's failure, in the runtime's words).
    pub reason: String,
    /// When (seconds since the epoch, the node's clock).
    pub at: i64,
}

/// A node reports its uplink's backlog once its oldest record waiting is
/// this old (live data goes up within a second or two).
pub const UPLINK_BACKLOG_AFTER_MS: u64 = 30_000;

/// A node's data waiting to go up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkReport {
    /// Records (readings, app records) no anchor has acknowledged.
    pub records: u64,
    /// Time of the oldest of them (ms since the epoch, the node's clock).
    pub oldest_ms: u64,
    /// Readings its quota dropped unacknowledged, ever (each counted in a
    /// summary that goes up instead).
    pub summarised: u64,
}

/// Security events a node keeps in its report.
pub const SECURITY_REPORTED: usize = 8;

/// One security event a node saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityReport {
    /// When (seconds since the epoch, the node's clock).
    pub at: i64,
    /// Who it was about (a peer's name and id, or what it came from).
    pub who: String,
    /// What happened.
    pub reason: String,
}

/// How much of an artifact a node holds, and from whom it came.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactReport {
    /// The blob's hash (hex), which version of the artifact this is.
    pub hash: String,
    /// Bytes held and verified.
    pub held: u64,
    /// Its size.
    pub size: u64,
    /// Bytes received from each peer (by name) since the node started.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub from: BTreeMap<String, u64>,
    /// Why the node does not hold it (it does not fit the blob quota…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl NodeReport {
    /// The field writes that make a node document hold this report.
    pub fn ops(&self, doc: &Document) -> BTreeMap<String, Option<String>> {
        let mut desired = BTreeMap::new();
        flatten(
            "report",
            &serde_json::to_value(self).unwrap_or_default(),
            &mut desired,
        );
        let current = doc.fields("report.");
        let mut ops: BTreeMap<String, Option<String>> = desired
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        for k in current.keys() {
            if !desired.contains_key(k) {
                ops.insert(k.clone(), None);
            }
        }
        ops
    }

    /// Reads the report from a node document.
    pub fn read(doc: &Document) -> NodeReport {
        serde_json::from_value(unflatten("report", &doc.fields("report."))).unwrap_or_default()
    }
}

/// The kinds of entity in the fleet document (and the site document).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// `apps.*` in the fleet document.
    App,
    /// `configs.*` in the fleet document.
    Config,
    /// `nodes.*` in the fleet document.
    Node,
    /// The whole `site/<name>` document.
    SiteOverride,
    /// `profiles.*` in the fleet document.
    DeviceProfile,
    /// `devices.*` in the fleet document.
    Device,
    /// `artifacts.*` in the fleet document.
    Artifact,
}

impl Kind {
    /// The key prefix of this kind's entities (`apps`, `configs`, `nodes`).
    pub fn prefix(&self) -> &'static str {
        match self {
            Kind::App => "apps",
            Kind::Config => "configs",
            Kind::Node => "nodes",
            Kind::SiteOverride => "",
            Kind::DeviceProfile => "profiles",
            Kind::Device => "devices",
            Kind::Artifact => "artifacts",
        }
    }

    /// Name as written in manifests.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::App => "App",
            Kind::Config => "Config",
            Kind::Node => "Node",
            Kind::SiteOverride => "SiteOverride",
            Kind::DeviceProfile => "DeviceProfile",
            Kind::Device => "Device",
            Kind::Artifact => "Artifact",
        }
    }

    /// Parses a manifest kind or a CLI noun (`app`, `apps`, `App`).
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s.to_ascii_lowercase().trim_end_matches('s') {
            "app" => Kind::App,
            "config" => Kind::Config,
            "node" => Kind::Node,
            "siteoverride" | "site" => Kind::SiteOverride,
            "deviceprofile" | "profile" => Kind::DeviceProfile,
            "device" => Kind::Device,
            "artifact" => Kind::Artifact,
            _ => return None,
        })
    }
}

/// Reads every entity of one kind from a document.
pub fn entities<T: for<'de> Deserialize<'de>>(doc: &Document, kind: Kind) -> BTreeMap<String, T> {
    let prefix = format!("{}.", kind.prefix());
    let fields = doc.fields(&prefix);
    let mut out = BTreeMap::new();
    for key in fields.keys() {
        let rest = &key[prefix.len()..];
        if rest.contains('.') {
            continue; // a field, not a marker
        }
        let value = unflatten(key, &fields);
        if let Ok(spec) = serde_json::from_value::<T>(value) {
            out.insert(rest.to_string(), spec);
        }
    }
    out
}

/// The fleet document, read.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FleetView {
    /// Fleet name.
    pub name: String,
    /// Apps by name.
    pub apps: BTreeMap<String, AppSpec>,
    /// Configs by name.
    pub configs: BTreeMap<String, ConfigSpec>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, NodeSpec>,
    /// Device profiles by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub profiles: BTreeMap<String, crate::fleet::device::DeviceProfileSpec>,
    /// Devices by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, crate::fleet::device::DeviceSpec>,
    /// Artifacts by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifacts: BTreeMap<String, ArtifactSpec>,
    /// Rollouts by app.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollouts: BTreeMap<String, crate::fleet::rollout::RolloutState>,
}

impl FleetView {
    /// Reads the fleet document.
    pub fn read(doc: &Document) -> Self {
        FleetView {
            name: doc
                .get("fleet.name")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            apps: entities(doc, Kind::App),
            configs: entities(doc, Kind::Config),
            nodes: entities(doc, Kind::Node),
            profiles: entities(doc, Kind::DeviceProfile),
            devices: entities(doc, Kind::Device),
            artifacts: entities(doc, Kind::Artifact),
            rollouts: crate::fleet::rollout::read_all(doc),
        }
    }
}

/// Reads a site document.
pub fn read_site(doc: &Document) -> SiteOverrideSpec {
    let mut fields = doc.fields("apps.");
    fields.extend(doc.fields("configs."));
    fields.extend(doc.fields("devices."));
    serde_json::from_value(unflatten_root(&fields)).unwrap_or_default()
}

/// Unflattens keys that have no common prefix.
pub(crate) fn unflatten_root(fields: &BTreeMap<String, String>) -> Value {
    let prefixed: BTreeMap<String, String> = fields
        .iter()
        .map(|(k, v)| (format!("_.{k}"), v.clone()))
        .collect();
    unflatten("_", &prefixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_roundtrips_free_form_keys() {
        let v = serde_json::json!({
            "selector": {"topology.kubernetes.io/zone": "a%b"},
            "native": {"command": ["x", "y"], "env": {"A.B": "1"}},
            "replicas": 3,
            "gone": null,
        });
        let mut out = BTreeMap::new();
        flatten("apps.x", &v, &mut out);
        assert!(out.contains_key("apps.x.selector.topology%2Ekubernetes%2Eio/zone"));
        assert_eq!(out.get("apps.x.replicas").map(String::as_str), Some("3"));
        assert!(!out.keys().any(|k| k.contains("gone")));
        let back = unflatten("apps.x", &out);
        let mut expected = v.clone();
        expected.as_object_mut().map(|o| o.remove("gone"));
        assert_eq!(back, expected);
    }

    #[test]
    fn node_reports_write_only_what_changed() -> anyhow::Result<()> {
        use crate::signed::identity::{Identity, Role, generate_key};
        let root = generate_key()?;
        let me = Identity::issue(&root, generate_key()?, "n1", Role::Node, Some("a"), 0)?;
        let mut doc = Document::new(crate::signed::doc::DocId::Node {
            name: "n1".into(),
            epoch: 0,
        });
        let mut report = NodeReport::default();
        report.workloads.insert(
            "inspect".into(),
            WorkloadReport {
                state: WorkloadState::Running,
                ..Default::default()
            },
        );
        doc.edit(&me, 0, &report.ops(&doc))?;
        assert_eq!(NodeReport::read(&doc), report);
        assert!(
            report.ops(&doc).is_empty(),
            "an unchanged report writes nothing"
        );
        if let Some(w) = report.workloads.get_mut("inspect") {
            w.state = WorkloadState::Failed;
            w.reason = Some("exited with 127: /usr/bin/inspect not found".into());
        }
        let ops = report.ops(&doc);
        assert_eq!(ops.len(), 2, "{ops:?}");
        doc.edit(&me, 1, &ops)?;
        assert_eq!(NodeReport::read(&doc), report);
        Ok(())
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("app", "inspect-2").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", "a/b", &"x".repeat(64)] {
            assert!(validate_name("app", bad).is_err(), "{bad}");
        }
    }
}
