//! Scenario files (TOML).
//!
//! ```toml
//! name = "site-a-cut-off-for-a-week"
//! seed = 7
//! duration = "8d"
//! group = [
//!   { name = "anchor", count = 1, role = "anchor" },
//!   { name = "a", count = 20, site = "a" },
//! ]
//! link = [
//!   { between = ["anchor", "a"], latency = "80ms", loss = 0.01 },
//!   { within = "a", latency = "2ms" },
//! ]
//! event = [
//!   { at = "1h", partition = [["anchor"], ["a"]] },
//!   { at = "2h", edit = { by = "operator", on = "anchor", doc = "fleet", set = { "apps.inspect.image" = "v2" } } },
//!   { at = "7d", heal = true },
//! ]
//! expect = { converged_within = "5s" }
//! ```
//!
//! Links: `between = [A, B]` connects every node of the larger group to one
//! node of the other (round robin), so an anchor group of one links to all;
//! either side may name one node (`c[0]`);
//! `within = G` links each node of G to the next (a chain; `ring = true`
//! closes it). Node references are `group` (its first node) or `group[i]`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// A scenario could not be read.
#[derive(Debug, thiserror::Error)]
#[error("scenario: {0}")]
pub struct ScenarioError(pub String);

/// A duration written as `250us`, `80ms`, `5s`, `2m`, `1h` or `7d`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses `250us`, `80ms`, `1.5s`, `2m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("duration {s:?} has no unit (us, ms, s, m, h, d)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: {num:?} is not a number"))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => return Err(format!("duration {s:?}: unknown unit {other:?}")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A group of identical nodes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Group name, used by links and events.
    pub name: String,
    /// How many nodes.
    #[serde(default = "one")]
    pub count: usize,
    /// `anchor` or `node`.
    #[serde(default = "node_role")]
    pub role: String,
    /// Site of the group's nodes (nodes need one).
    #[serde(default)]
    pub site: Option<String>,
}

fn one() -> usize {
    1
}

fn node_role() -> String {
    "node".into()
}

/// A kind of link.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Two groups to connect.
    #[serde(default)]
    pub between: Option<[String; 2]>,
    /// One group to chain.
    #[serde(default)]
    pub within: Option<String>,
    /// Close the chain into a ring.
    #[serde(default)]
    pub ring: bool,
    /// One-way latency.
    #[serde(default)]
    pub latency: Dur,
    /// Up to this much extra delay, uniformly.
    #[serde(default)]
    pub jitter: Dur,
    /// Probability a packet is lost (costs a retransmission: one more round trip).
    #[serde(default)]
    pub loss: f64,
    /// Bytes per second (unlimited when absent).
    #[serde(default)]
    pub bandwidth: Option<u64>,
}

/// An edit someone makes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    /// `operator`, `site-engineer:<site>` or `node` (the node itself).
    pub by: String,
    /// Node reference where the edit is made.
    pub on: String,
    /// Document id (`fleet`, `site/a`, `node/<name>/0`).
    pub doc: String,
    /// Fields to set.
    pub set: BTreeMap<String, toml::Value>,
}

/// An operator applies manifests (YAML, as `shoal apply` takes them) on a
/// node (an anchor, usually).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Apply {
    /// Node reference where it is applied.
    pub on: String,
    /// The manifests.
    pub manifest: String,
}

/// Apps simulated on the nodes, for rollouts: every node runs its share
/// (as the core computes it) on a pretend runtime, and reports it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// How long a version takes to be running.
    #[serde(default = "one_second")]
    pub start: Dur,
    /// Versions (`spec.version`) that fail on every node.
    #[serde(default)]
    pub bad: Vec<String>,
    /// How long a bad version runs before it has crashed three times.
    #[serde(default = "one_second")]
    pub fail_after: Dur,
}

fn one_second() -> Dur {
    Dur(Duration::from_secs(1))
}

/// What a rollout must look like at the end.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRollout {
    /// The app.
    pub app: String,
    /// `rolling`, `paused`, `halted`, `aborted` or `done`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Every live node that runs the app runs this version.
    #[serde(default)]
    pub all_run: Option<String>,
    /// At most this many nodes ever ran a bad version.
    #[serde(default)]
    pub ran_bad_at_most: Option<usize>,
    /// Exactly this many waves open (wave 0 included).
    #[serde(default)]
    pub waves_open: Option<usize>,
}

/// Clock skew of one node: `by = "3d"` (ahead) or `by = "-2h"` (behind),
/// like every other time in a scenario; `seconds = N` is still read.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Skew {
    /// Node reference.
    pub node: String,
    /// How far its clock is off, a duration with an optional `-`.
    #[serde(default)]
    pub by: Option<String>,
    /// The same in seconds (the older form).
    #[serde(default)]
    pub seconds: Option<i64>,
}

impl Skew {
    /// The skew in whole seconds (negative: behind).
    pub fn secs(&self) -> Result<i64, ScenarioError> {
        match (&self.by, self.seconds) {
            (Some(by), None) => {
                let (sign, d) = match by.trim().strip_prefix('-') {
                    Some(rest) => (-1, rest),
                    None => (1, by.trim()),
                };
                let d = parse_duration(d)
                    .map_err(|e| ScenarioError(format!("skew of {}: {e}", self.node)))?;
                Ok(sign * d.as_secs() as i64)
            }
            (None, Some(s)) => Ok(s),
            _ => Err(ScenarioError(format!(
                "skew of {}: give exactly one of `by` (a duration such as \"-3d\") or `seconds`",
                self.node
            ))),
        }
    }
}

/// A timed event; exactly one of the optional fields.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// When.
    pub at: Dur,
    /// Cut every link between groups on different sides.
    #[serde(default)]
    pub partition: Option<Vec<Vec<String>>>,
    /// Restore every cut link.
    #[serde(default)]
    pub heal: Option<bool>,
    /// An edit.
    #[serde(default)]
    pub edit: Option<Edit>,
    /// Crash a node (it loses what it had not persisted).
    #[serde(default)]
    pub crash: Option<String>,
    /// Restart a crashed node from its store.
    #[serde(default)]
    pub restart: Option<String>,
    /// A node forges a fleet change and sends it to its neighbours.
    #[serde(default)]
    pub rogue: Option<String>,
    /// Skew a node's clock.
    #[serde(default)]
    pub skew: Option<Skew>,
    /// Apply manifests (an operator's `shoal apply`).
    #[serde(default)]
    pub apply: Option<Apply>,
}

/// What must hold at the end.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Every replica equal within this long after the last heal.
    #[serde(default)]
    pub converged_within: Option<Dur>,
    /// This many fields in conflict at the end (when given).
    #[serde(default)]
    pub conflicts: Option<usize>,
    /// Rollouts.
    #[serde(default, rename = "rollout")]
    pub rollouts: Vec<ExpectRollout>,
}

/// A whole scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name, for reports.
    pub name: String,
    /// Seed of all randomness.
    #[serde(default = "seed1")]
    pub seed: u64,
    /// Virtual time to run.
    pub duration: Dur,
    /// Node groups.
    #[serde(rename = "group")]
    pub groups: Vec<Group>,
    /// Links.
    #[serde(rename = "link", default)]
    pub links: Vec<Link>,
    /// Events.
    #[serde(rename = "event", default)]
    pub events: Vec<Event>,
    /// Expectations.
    #[serde(default)]
    pub expect: Expect,
    /// How long a store's commit takes (default: at once). A node that
    /// crashes within it loses the changes of that commit, and nothing
    /// that followed them was sent.
    #[serde(default)]
    pub commit_latency: Dur,
    /// Run the nodes' shares on a pretend runtime, report them, and let
    /// anchors judge rollouts' gates (every node is registered in the
    /// fleet document at the start, with its group's site).
    #[serde(default)]
    pub runtime: Option<Runtime>,
}

fn seed1() -> u64 {
    1
}

impl Scenario {
    /// Parses and checks a scenario.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError(e.to_string()))?;
        for g in &s.groups {
            if g.role != "anchor" && g.role != "node" {
                return Err(ScenarioError(format!(
                    "group {}: role {:?} is not anchor or node",
                    g.name, g.role
                )));
            }
            if g.role == "node" && g.site.is_none() {
                return Err(ScenarioError(format!(
                    "group {}: nodes need a site",
                    g.name
                )));
            }
            if g.count == 0 || g.count > 100_000 {
                return Err(ScenarioError(format!(
                    "group {}: count {} out of range",
                    g.name, g.count
                )));
            }
        }
        let known = |r: &str| {
            let group = r.split('[').next().unwrap_or(r);
            s.groups.iter().any(|g| g.name == group)
        };
        for e in &s.events {
            for side in e.partition.iter().flatten() {
                for r in side {
                    if !known(r) {
                        return Err(ScenarioError(format!(
                            "partition at {:?} names {r:?}, which is no group and no node",
                            e.at.0
                        )));
                    }
                }
            }
            if let Some(k) = &e.skew {
                k.secs()?;
            }
            if let Some(a) = &e.apply {
                if !known(&a.on) {
                    return Err(ScenarioError(format!(
                        "apply at {:?} is on {:?}, which is no group and no node",
                        e.at.0, a.on
                    )));
                }
                crdt_state::fleet::manifest::parse("apply", &a.manifest)
                    .map_err(|x| ScenarioError(format!("apply at {:?}: {x}", e.at.0)))?;
            }
        }
        for l in &s.links {
            let names: Vec<&String> = l.between.iter().flatten().chain(l.within.iter()).collect();
            if names.is_empty() {
                return Err(ScenarioError("a link needs `between` or `within`".into()));
            }
            for n in names {
                let group = n.split('[').next().unwrap_or(n);
                if !s.groups.iter().any(|g| g.name == group) {
                    return Err(ScenarioError(format!("link names unknown group {n:?}")));
                }
            }
            if !(0.0..1.0).contains(&l.loss) {
                return Err(ScenarioError(format!(
                    "link loss {} is not in [0, 1)",
                    l.loss
                )));
            }
        }
        Ok(s)
    }
}
