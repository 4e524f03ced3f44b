//! `shoal device read|write`: a field engineer's view of a node's devices
//! through its site API. A write is a setpoint in the site's overrides,
//! signed with the engineer's key like any site edit; the node writes it to
//! the device, reads it back, and the command waits for that outcome.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde_json::Value;

use crate::site_api::Client;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Latest values (and state) of one device; with `since`, the stored
/// readings of one resource over that window.
pub fn read(
    node: &str,
    identity: &Path,
    device: Option<&str>,
    resource: Option<&str>,
    since: Option<Duration>,
    json: bool,
) -> anyhow::Result<String> {
    let client = Client::new(node, crdt_state::Identity::read(identity)?);
    if json && since.is_none() {
        let v = client.get("/api/devices")?;
        let v = match device {
            Some(d) => v["devices"]
                .get(d)
                .cloned()
                .ok_or_else(|| anyhow!("{node} polls no device {d:?}"))?,
            None => v,
        };
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    let device = device.ok_or_else(|| anyhow!("name a device (or pass --json for all)"))?;
    if let Some(window) = since {
        let res = resource.ok_or_else(|| anyhow!("--since needs a resource"))?;
        let to = now_ms();
        let from = to.saturating_sub(window.as_millis() as u64);
        let v = client.get(&format!(
            "/api/devices/{}/{}/range/{from}/{to}",
            enc(device),
            enc(res)
        ))?;
        let mut out = String::new();
        for row in v["readings"].as_array().into_iter().flatten() {
            out.push_str(&format!("{}\t{}\n", row[0], row[1]));
        }
        return Ok(out);
    }
    let v = client.get("/api/devices")?;
    let d = v["devices"]
        .get(device)
        .ok_or_else(|| anyhow!("{node} polls no device {device:?}"))?;
    let mut rows = Vec::new();
    for (r, x) in d["latest"].as_object().into_iter().flatten() {
        if resource.is_some_and(|want| want != r) {
            continue;
        }
        let age = x["at_ms"]
            .as_u64()
            .map(|at| format!("{:.1}s ago", now_ms().saturating_sub(at) as f64 / 1000.0))
            .unwrap_or_default();
        let value = if x.get("value").is_some() {
            x["value"].to_string()
        } else {
            "-".into()
        };
        let error = x["error"].as_str().unwrap_or("").to_string();
        rows.push(vec![r.clone(), value, age, error]);
    }
    if let Some(want) = resource
        && rows.is_empty()
    {
        bail!("{device} has no reading of {want:?} yet");
    }
    let mut out = format!(
        "device {device}: {}{}\n",
        match d["online"].as_bool() {
            Some(true) => "online",
            Some(false) => "offline",
            None => "not polled yet",
        },
        d["error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    out.push_str(&daemon::render::table(
        &["RESOURCE", "VALUE", "READ", "ERROR"],
        rows,
    ));
    Ok(out)
}

/// Prints the live readings of one device (or all) until interrupted.
pub fn follow(node: &str, identity: &Path, device: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write;
    let client = Client::new(node, crdt_state::Identity::read(identity)?);
    let mut out = std::io::stdout();
    client.follow(crate::site_api::LIVE_PATH, |line| {
        let keep = match device {
            Some(d) => serde_json::from_str::<Value>(line)
                .is_ok_and(|v| v["device"] == d || v.get("lagged").is_some()),
            None => true,
        };
        if keep {
            // A closed stdout (the reader went away) ends the stream.
            return writeln!(out, "{line}").and_then(|_| out.flush()).is_ok();
        }
        true
    })
}

/// Sets a setpoint through the site's overrides and waits for the node to
/// write and read it back (or refuse it).
pub fn write(
    node: &str,
    identity: &Path,
    device: &str,
    resource: &str,
    value: &str,
    wait: Duration,
) -> anyhow::Result<String> {
    let v: Value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    let client = Client::new(node, crdt_state::Identity::read(identity)?);
    let view = client.get("/api/view")?;
    let site = view["site"]
        .as_str()
        .ok_or_else(|| anyhow!("the node answered no site"))?
        .to_string();
    // The whole site document is declared: keep what it holds.
    let mut spec = view["site_overrides"].clone();
    if !spec.is_object() {
        spec = serde_json::json!({});
    }
    spec["devices"][device]["setpoints"][resource] = v.clone();
    let text = serde_json::to_string(&serde_json::json!({
        "apiVersion": crdt_state::fleet::manifest::API_VERSION,
        "kind": "SiteOverride",
        "metadata": { "name": site },
        "spec": spec,
    }))?;
    let manifests = crdt_state::fleet::manifest::parse("device write", &text)?;
    crate::site_api::apply(node, identity, &manifests)?;
    let deadline = Instant::now() + wait;
    loop {
        let state = client.get("/api/devices")?;
        let sp = &state["devices"][device]["setpoints"][resource];
        if sp["desired"] == v {
            if sp["applied"] == Value::Bool(true) {
                return Ok(format!(
                    "{device}/{resource} = {} (written and read back)\n",
                    sp["read_back"]
                ));
            }
            if let Some(e) = sp["error"].as_str() {
                bail!("{device}/{resource}: not applied: {e}");
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "{device}/{resource}: the setpoint is in the site's desired state, but the node did not report it applied within {} s",
                wait.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
