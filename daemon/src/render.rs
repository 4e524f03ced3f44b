//! Output for people (tables) and machines (JSON, YAML).

use std::collections::BTreeMap;

use serde::Serialize;

use crdt_state::fleet::model::FleetView;
use crdt_state::local::datadir::{Applied, ChangeEntry, Conflict};

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Table => "table",
            Format::Json => "json",
            Format::Yaml => "yaml",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Format::Table),
            "json" => Ok(Format::Json),
            "yaml" => Ok(Format::Yaml),
            other => Err(format!(
                "unknown output format {other:?}: expected table, json or yaml"
            )),
        }
    }
}

/// `ms` since the epoch as UTC, `YYYY-MM-DDTHH:MM:SSZ`, or with `.mmm`
/// before the `Z` when `millis`; no calendar crate.
pub fn utc(ms: u64, millis: bool) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian), by
    // 400-year eras of 146,097 days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let frac = if millis {
        format!(".{:03}", ms % 1000)
    } else {
        String::new()
    };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Renders `value` as JSON or YAML, or `rows` as a table with `header`.
pub fn render<T: Serialize>(
    format: Format,
    value: &T,
    header: &[&str],
    rows: Vec<Vec<String>>,
) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
        Format::Yaml => serde_yaml::to_string(value).unwrap_or_default(),
        Format::Table => table(header, rows),
    }
}

/// Aligns columns.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(&c);
            if i + 1 < n {
                let pad = widths[i].saturating_sub(c.chars().count()) + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r, &mut out);
    }
    out
}

fn kv(map: &std::collections::BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `shoal get apps`.
pub fn apps(format: Format, fleet: &FleetView) -> String {
    let rows = fleet
        .apps
        .iter()
        .map(|(n, a)| {
            vec![
                n.clone(),
                format!("{:?}", a.runtime).to_lowercase(),
                a.version.clone().unwrap_or_else(|| "-".into()),
                a.replicas
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "all".into()),
                kv(&a.selector),
            ]
        })
        .collect();
    render(
        format,
        &fleet.apps,
        &["NAME", "RUNTIME", "VERSION", "REPLICAS", "SELECTOR"],
        rows,
    )
}

/// `shoal get configs`.
pub fn configs(format: Format, fleet: &FleetView) -> String {
    let rows = fleet
        .configs
        .iter()
        .map(|(n, c)| {
            vec![
                n.clone(),
                c.data.keys().cloned().collect::<Vec<_>>().join(","),
            ]
        })
        .collect();
    render(format, &fleet.configs, &["NAME", "KEYS"], rows)
}

/// `shoal get profiles`.
pub fn profiles(format: Format, fleet: &FleetView) -> String {
    let rows = fleet
        .profiles
        .iter()
        .map(|(n, p)| {
            vec![
                n.clone(),
                p.resources.len().to_string(),
                p.description.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    render(
        format,
        &fleet.profiles,
        &["NAME", "RESOURCES", "DESCRIPTION"],
        rows,
    )
}

/// `shoal get devices`.
pub fn devices(format: Format, fleet: &FleetView) -> String {
    let rows = fleet
        .devices
        .iter()
        .map(|(n, d)| {
            let addr = match (&d.tcp, &d.rtu, &d.opcua) {
                (Some(t), _, _) => format!("{}:{} unit {}", t.host, t.port, t.unit),
                (_, Some(r), _) => format!("{} {} baud unit {}", r.path, r.baud, r.unit),
                (_, _, Some(o)) => o.endpoint.clone(),
                _ => "-".into(),
            };
            vec![
                n.clone(),
                d.profile.clone(),
                d.node.clone(),
                format!("{:?}", d.protocol).to_lowercase(),
                addr,
                format!("{} ms", d.poll_ms),
            ]
        })
        .collect();
    render(
        format,
        &fleet.devices,
        &["NAME", "PROFILE", "NODE", "PROTOCOL", "ADDRESS", "POLL"],
        rows,
    )
}

/// Node → artifact → how much of it the node holds (from node reports).
pub type Holdings = BTreeMap<String, BTreeMap<String, crdt_state::fleet::model::ArtifactReport>>;

/// Node → artifact → what each node reports, from the nodes' reports.
pub fn holdings(reports: &BTreeMap<String, crdt_state::fleet::model::NodeReport>) -> Holdings {
    reports
        .iter()
        .filter(|(_, r)| !r.artifacts.is_empty())
        .map(|(n, r)| (n.clone(), r.artifacts.clone()))
        .collect()
}

/// `shoal get artifacts`: each artifact, and per node that reports it how
/// much of it is held and from whom it came (or why it is not kept).
pub fn artifacts(format: Format, fleet: &FleetView, holdings: &Holdings) -> String {
    let holders = |name: &str, hash: &str| {
        holdings
            .iter()
            .filter_map(|(node, held)| {
                held.get(name)
                    .filter(|a| a.hash == hash)
                    .map(|a| (node.clone(), a.clone()))
            })
            .collect::<BTreeMap<_, _>>()
    };
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    for (n, a) in &fleet.artifacts {
        let nodes = holders(n, &a.hash);
        let head = |node: String, held: String, from: String| {
            vec![
                n.clone(),
                bytes(a.size),
                a.hash.chars().take(12).collect(),
                node,
                held,
                from,
            ]
        };
        if nodes.is_empty() {
            rows.push(head("-".into(), "-".into(), String::new()));
        }
        for (node, r) in &nodes {
            let held = match &r.error {
                Some(e) => format!("not kept: {e}"),
                None if r.held >= r.size => "whole".into(),
                None => format!(
                    "{}% ({})",
                    r.held.saturating_mul(100) / r.size.max(1),
                    bytes(r.held)
                ),
            };
            let from = r
                .from
                .iter()
                .map(|(p, b)| format!("{p} {}", bytes(*b)))
                .collect::<Vec<_>>()
                .join(", ");
            rows.push(head(node.clone(), held, from));
        }
        let mut v = serde_json::to_value(a).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "nodes".into(),
                serde_json::to_value(&nodes).unwrap_or_default(),
            );
        }
        json.insert(n.clone(), v);
    }
    render(
        format,
        &json,
        &["NAME", "SIZE", "HASH", "NODE", "HELD", "FROM"],
        rows,
    )
}

/// A size for people (1000-based units, as disks are sold).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `shoal get nodes`.
pub fn nodes(format: Format, fleet: &FleetView) -> String {
    nodes_with_contacts(format, fleet, None, &Default::default(), 0)
}

/// What a running daemon knows of a node's connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Contact {
    /// Connected now.
    pub connected: bool,
    /// When it was last heard from (Unix seconds).
    pub last_contact: Option<i64>,
}

#[derive(Serialize)]
struct NodeRow<'a> {
    #[serde(flatten)]
    spec: &'a crdt_state::fleet::model::NodeSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    connected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_contact: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<&'a crdt_state::fleet::model::NodeReport>,
}

/// `shoal get nodes`, with connection columns when a daemon answers
/// (`contacts`, ages relative to `now`); without one they show `-`.
pub fn nodes_with_contacts(
    format: Format,
    fleet: &FleetView,
    contacts: Option<&std::collections::BTreeMap<String, Contact>>,
    reports: &std::collections::BTreeMap<String, crdt_state::fleet::model::NodeReport>,
    now: i64,
) -> String {
    let none = Contact::default();
    let rows = fleet
        .nodes
        .iter()
        .map(|(n, s)| {
            let c = contacts.map(|m| m.get(n).unwrap_or(&none));
            vec![
                n.clone(),
                s.site.clone(),
                kv(&s.labels),
                match c {
                    Some(c) if c.connected => "yes".into(),
                    Some(_) => "no".into(),
                    None => "-".into(),
                },
                c.and_then(|c| c.last_contact)
                    .map(|t| format!("{}s ago", (now - t).max(0)))
                    .unwrap_or_else(|| "-".into()),
                reports
                    .get(n)
                    .map(|r| {
                        r.workloads
                            .iter()
                            .map(|(a, w)| {
                                format!("{a}:{}", format!("{:?}", w.state).to_lowercase())
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let value: std::collections::BTreeMap<&String, NodeRow> = fleet
        .nodes
        .iter()
        .map(|(n, s)| {
            let c = contacts.map(|m| m.get(n).unwrap_or(&none));
            (
                n,
                NodeRow {
                    spec: s,
                    connected: c.map(|c| c.connected),
                    last_contact: c.and_then(|c| c.last_contact),
                    report: reports.get(n),
                },
            )
        })
        .collect();
    render(
        format,
        &value,
        &[
            "NAME",
            "SITE",
            "LABELS",
            "CONNECTED",
            "LAST CONTACT",
            "WORKLOADS",
        ],
        rows,
    )
}

/// `shoal get conflicts`.
pub fn conflicts(format: Format, conflicts: &[Conflict]) -> String {
    let mut rows = Vec::new();
    for c in conflicts {
        for v in &c.values {
            rows.push(vec![
                c.doc.clone(),
                c.field.clone(),
                v.value.to_string(),
                v.writer.clone(),
                v.role.map(|r| r.to_string()).unwrap_or_else(|| "?".into()),
                if v.winner { "yes".into() } else { "no".into() },
            ]);
        }
    }
    render(
        format,
        &conflicts,
        &["DOC", "FIELD", "VALUE", "WRITER", "ROLE", "WINS"],
        rows,
    )
}

/// `shoal get changes`: the latest signed changes to desired state.
pub fn changes(format: Format, changes: &[ChangeEntry]) -> String {
    let rows = changes
        .iter()
        .map(|c| {
            vec![
                utc(c.time.max(0) as u64 * 1000, false),
                c.doc.clone(),
                c.writer.clone(),
                c.role.map(|r| r.to_string()).unwrap_or_else(|| "?".into()),
                c.ops.to_string(),
                c.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    render(
        format,
        &changes,
        &["TIME", "DOC", "WRITER", "ROLE", "OPS", "MESSAGE"],
        rows,
    )
}

/// `shoal apply`.
pub fn applied(format: Format, applied: &[Applied]) -> String {
    match format {
        Format::Table => applied
            .iter()
            .map(|a| {
                let what = format!("{}/{}", a.kind.as_str().to_lowercase(), a.name);
                if a.fields == 0 {
                    format!("{what} unchanged\n")
                } else {
                    format!("{what} configured ({} fields in {})\n", a.fields, a.doc)
                }
            })
            .collect(),
        f => render(f, &applied, &[], vec![]),
    }
}

/// `shoal get sites`: each site's overrides.
pub fn sites(
    format: Format,
    sites: &std::collections::BTreeMap<String, crdt_state::fleet::model::SiteOverrideSpec>,
) -> String {
    let rows = sites
        .iter()
        .map(|(name, s)| {
            vec![
                name.clone(),
                s.apps
                    .iter()
                    .map(|(a, o)| format!("{a}:{}", serde_json::to_string(o).unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(" "),
                s.configs.keys().cloned().collect::<Vec<_>>().join(","),
            ]
        })
        .collect();
    render(
        format,
        sites,
        &["SITE", "APP OVERRIDES", "CONFIG OVERRIDES"],
        rows,
    )
}

/// A rollout's status: per wave, what the gate waits for, why nodes
/// failed, and every decision with its author.
pub fn rollout(format: Format, s: &crdt_state::fleet::rollout::RolloutStatus) -> String {
    if format != Format::Table {
        return render(format, s, &[], Vec::new());
    }
    let mut out = format!(
        "{} {} (from {}): {}, revision {}\n",
        s.app,
        s.version.as_deref().unwrap_or("-"),
        s.from_version.as_deref().unwrap_or("-"),
        s.phase,
        s.revision
    );
    let rows = s
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            vec![
                i.to_string(),
                w.nodes.to_string(),
                if w.open { "yes" } else { "no" }.to_string(),
                w.updated.to_string(),
                w.healthy.to_string(),
                w.failed.to_string(),
                w.unreachable.to_string(),
            ]
        })
        .collect();
    out += &table(
        &[
            "WAVE",
            "NODES",
            "OPEN",
            "UPDATED",
            "HEALTHY",
            "FAILED",
            "UNREACHABLE",
        ],
        rows,
    );
    if !s.waiting_for.is_empty() {
        out += &format!("waiting: {}\n", s.waiting_for);
    }
    for (i, w) in s.waves.iter().enumerate() {
        for (node, why) in &w.failures {
            out += &format!("failed in wave {i}: {node}: {why}\n");
        }
    }
    for (what, m) in &s.decisions {
        out += &format!(
            "{} {what} by {}{}\n",
            utc(m.at.max(0) as u64 * 1000, false),
            m.by,
            if m.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", m.reason)
            }
        );
    }
    out
}
