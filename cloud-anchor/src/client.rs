//! The CLI's side of the API: `shoal apply|get|delete --anchor URL --token T`,
//! and with `--identity FILE` the edits signed here with the operator's own
//! key (`GET /api/bundle`, `POST /api/changes`).
//! Answers are the text the same verbs print on a local data dir.

use std::path::Path;
use std::time::Duration;

use crdt_state::DocId;
use crdt_state::fleet::manifest::{Manifest, Spec};
use crdt_state::fleet::model::Kind;
use crdt_state::local::datadir::{Applied, edit_offline};
use daemon::driver::unix_now;

use anyhow::{anyhow, bail};
use serde_json::json;

/// Largest answer read.
const MAX_ANSWER: u64 = 256 << 20;

/// A client of one anchor.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `base` (`http://host:port` or `https://…`).
    pub fn new(base: &str, token: &str) -> Client {
        Client::with_tls(base, token, None)
    }

    /// A client that trusts the CA certificates in the PEM file `ca` (the
    /// fleet's `tls-ca.pem`) for an `https://` anchor, instead of the
    /// public CAs it trusts without one.
    pub fn with_ca(base: &str, token: &str, ca: Option<&Path>) -> anyhow::Result<Client> {
        let tls = match ca {
            Some(ca) => Some(
                trusting(&std::fs::read(ca).map_err(|e| anyhow!("{}: {e}", ca.display()))?)
                    .map_err(|e| anyhow!("{}: {e}", ca.display()))?,
            ),
            None => None,
        };
        Ok(Client::with_tls(base, token, tls))
    }

    fn with_tls(base: &str, token: &str, tls: Option<ureq::tls::TlsConfig>) -> Client {
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false);
        if let Some(tls) = tls {
            config = config.tls_config(tls);
        }
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            agent: config.build().into(),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> anyhow::Result<String> {
        let body = body.map(|b| (b.into_bytes(), "application/json"));
        let bytes = self.call_bytes(method, path, body)?;
        String::from_utf8(bytes).map_err(|_| anyhow!("{}{path}: the answer is not text", self.base))
    }

    fn call_bytes(
        &self,
        method: &str,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let resp = match (method, body) {
            ("POST", Some((b, content_type))) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", content_type)
                .send(&b[..]),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            _ => self.agent.get(&url).header("Authorization", &auth).call(),
        };
        let mut resp = resp.map_err(|e| anyhow!("{url}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_vec()
            .map_err(|e| anyhow!("{url}: {e}"))?;
        if status >= 400 {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            if status == 401 {
                bail!("the anchor refused the token ({status}): {msg}");
            }
            bail!("the anchor answered {status}: {msg}");
        }
        Ok(bytes)
    }

    /// The signed changes of `docs` (of every document when empty), as an
    /// offline bundle.
    pub fn bundle(&self, docs: &[DocId]) -> anyhow::Result<Vec<u8>> {
        if docs.is_empty() {
            return self.call_bytes("GET", "/api/bundle", None);
        }
        let only: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
        self.call_bytes(
            "GET",
            &format!("/api/bundle?only={}", encode(&only.join(","))),
            None,
        )
    }

    /// Posts signed changes (an offline bundle's encoding).
    pub fn post_changes(&self, bundle: Vec<u8>) -> anyhow::Result<()> {
        self.call_bytes(
            "POST",
            "/api/changes",
            Some((bundle, "application/octet-stream")),
        )?;
        Ok(())
    }

    /// `shoal apply --anchor URL --identity FILE`: the documents the
    /// manifests write are fetched, the edit is made and signed here with
    /// the operator's own key, and only the signed changes are sent. The
    /// anchor checks them like any synced change: it never signs for us.
    pub fn apply_signed(
        &self,
        identity_file: &Path,
        manifests: &[Manifest],
    ) -> anyhow::Result<Vec<Applied>> {
        let mut docs = vec![DocId::Fleet];
        for m in manifests {
            if let Spec::SiteOverride(_) = m.spec {
                docs.push(DocId::Site(m.name.clone()));
            }
        }
        docs.dedup();
        let bundle = self.bundle(&docs)?;
        let (applied, changes) =
            edit_offline(&bundle, identity_file, |dd| dd.apply(manifests, unix_now()))?;
        if let Some(changes) = changes {
            self.post_changes(changes)?;
        }
        Ok(applied)
    }

    /// `shoal identity revoke WHO --anchor URL --identity FILE`: the
    /// revocation (with the watermarks of the changes the fetched documents
    /// hold) is made and signed here and posted as changes.
    pub fn revoke_signed(
        &self,
        identity_file: &Path,
        who: &str,
        reason: &str,
    ) -> anyhow::Result<String> {
        let bundle = self.bundle(&[])?;
        let (key, changes) = edit_offline(&bundle, identity_file, |dd| {
            let key = dd.find_key(who)?;
            dd.revoke(key, reason, unix_now())?;
            Ok(key)
        })?;
        if let Some(changes) = changes {
            self.post_changes(changes)?;
        }
        Ok(format!("{who} ({}) revoked\n", key.short()))
    }

    /// `shoal delete KIND NAME --anchor URL --identity FILE`, signed here.
    pub fn delete_signed(
        &self,
        identity_file: &Path,
        kind: &str,
        name: &str,
    ) -> anyhow::Result<String> {
        let k = Kind::parse(kind)
            .ok_or_else(|| anyhow!("unknown kind {kind:?}: expected app, config, node or site"))?;
        let target = crdt_state::local::datadir::delete_target(k, name);
        let mut docs = vec![DocId::Fleet, target];
        docs.dedup();
        let bundle = self.bundle(&docs)?;
        let (n, changes) =
            edit_offline(&bundle, identity_file, |dd| dd.delete(k, name, unix_now()))?;
        if let Some(changes) = changes {
            self.post_changes(changes)?;
        }
        Ok(format!(
            "{}/{name} deleted ({n} fields)\n",
            k.as_str().to_lowercase()
        ))
    }

    /// `shoal apply`: (label, text) of each file.
    pub fn apply(&self, files: &[(String, String)], output: &str) -> anyhow::Result<String> {
        let files: Vec<_> = files
            .iter()
            .map(|(name, text)| json!({ "name": name, "text": text }))
            .collect();
        let body = json!({ "files": files }).to_string();
        self.call("POST", &format!("/api/apply?output={output}"), Some(body))
    }

    /// `shoal get WHAT`.
    pub fn get(&self, what: &str, output: &str) -> anyhow::Result<String> {
        self.call(
            "GET",
            &format!("/api/get/{}?output={output}", encode(what)),
            None,
        )
    }

    /// `shoal rollout ACTION APP`: the status as text in `output`, or the
    /// action's result.
    pub fn rollout(&self, app: &str, action: &str, output: &str) -> anyhow::Result<String> {
        if action == "status" {
            return self.call(
                "GET",
                &format!("/api/rollouts/{}?output={output}", encode(app)),
                None,
            );
        }
        let answer = self.call(
            "POST",
            &format!("/api/rollouts/{}/{}", encode(app), encode(action)),
            Some(String::new()),
        )?;
        let v: serde_json::Value = serde_json::from_str(&answer)?;
        Ok(format!("{}\n", v["result"].as_str().unwrap_or_default()))
    }

    /// `shoal delete KIND NAME`.
    pub fn delete(&self, kind: &str, name: &str) -> anyhow::Result<String> {
        let kinds = crdt_state::fleet::model::Kind::parse(kind)
            .map(collection)
            .ok_or_else(|| anyhow!("unknown kind {kind:?}: expected app, config, node or site"))?;
        self.call("DELETE", &format!("/api/{kinds}/{}", encode(name)), None)?;
        Ok(format!("{}/{name} deleted\n", kinds.trim_end_matches('s')))
    }
}

/// The API's collection of a kind (`DELETE /api/{collection}/{name}`).
pub fn collection(kind: crdt_state::fleet::model::Kind) -> &'static str {
    use crdt_state::fleet::model::Kind;
    match kind {
        Kind::App => "apps",
        Kind::Config => "configs",
        Kind::Node => "nodes",
        Kind::SiteOverride => "sites",
        Kind::DeviceProfile => "profiles",
        Kind::Device => "devices",
        Kind::Artifact => "artifacts",
    }
}

impl Client {
    /// `shoal invite`: a one-time code for `name` to enroll a browser key
    /// as `role` (a site engineer of `site`), good for `ttl_s` seconds.
    pub fn invite(
        &self,
        name: &str,
        role: &str,
        site: Option<&str>,
        ttl_s: Option<i64>,
    ) -> anyhow::Result<serde_json::Value> {
        let body = json!({ "name": name, "role": role, "site": site, "ttl_s": ttl_s });
        let answer = self.call("POST", "/api/keys/invite", Some(body.to_string()))?;
        Ok(serde_json::from_str(&answer)?)
    }

    /// Every browser-key invitation and its state.
    pub fn keys(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let answer = self.call("GET", "/api/keys", None)?;
        let v: serde_json::Value = serde_json::from_str(&answer)?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// Sends the certificate the fleet root issued for an invited browser
    /// key, for the anchor to publish.
    pub fn post_certificate(
        &self,
        cert: &crdt_state::Certificate,
    ) -> anyhow::Result<serde_json::Value> {
        let body = json!({ "certificate": cert });
        let answer = self.call("POST", "/api/keys/certificates", Some(body.to_string()))?;
        Ok(serde_json::from_str(&answer)?)
    }
}

impl Client {
    /// `shoal data read`: a node's series from `from` to `to` (ms), every
    /// record or per `step` ms, as `table`, `csv` or `json`.
    pub fn series(
        &self,
        node: &str,
        series: &str,
        range: (u64, u64),
        step: u64,
        output: &str,
    ) -> anyhow::Result<String> {
        let (from, to) = range;
        let text = self.call(
            "GET",
            &format!(
                "/api/nodes/{}/series/{}?from={from}&to={to}&step={step}",
                encode(node),
                encode(series)
            ),
            None,
        )?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        render_series(&v, output)
    }
}

/// A series answer as `json` (as it came), `csv` or `table`: one row per
/// point (time in ms and UTC, value, and with a step count, min, max),
/// then one per summary and per gap, so nothing the chart shows is missing
/// from the text.
pub fn render_series(v: &serde_json::Value, output: &str) -> anyhow::Result<String> {
    let empty = Vec::new();
    let rows = |k: &str| v[k].as_array().unwrap_or(&empty).clone();
    let stepped = v["step"].as_u64().unwrap_or(0) > 0;
    let cell = |x: &serde_json::Value| match x {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let csv = |s: String| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s
        }
    };
    let mut lines: Vec<Vec<String>> = Vec::new();
    for p in rows("points") {
        let t = p["t"].as_u64().unwrap_or(0);
        let mut line = vec![t.to_string(), utc(t), "record".into(), cell(&p["v"])];
        if stepped {
            line.extend([cell(&p["count"]), cell(&p["min"]), cell(&p["max"])]);
        }
        lines.push(line);
    }
    for s in rows("summaries") {
        let t = s["t"].as_u64().unwrap_or(0);
        let m = &s["summary"];
        let mut line = vec![t.to_string(), utc(t), "summary".into(), cell(&m["mean"])];
        if stepped {
            line.extend([cell(&m["count"]), cell(&m["min"]), cell(&m["max"])]);
        } else {
            line.push(format!(
                "count={} min={} max={} until {}",
                cell(&m["count"]),
                cell(&m["min"]),
                cell(&m["max"]),
                utc(m["last_ms"].as_u64().unwrap_or(t))
            ));
        }
        lines.push(line);
    }
    for g in rows("gaps") {
        let (a, b) = (
            g["from"].as_u64().unwrap_or(0),
            g["to"].as_u64().unwrap_or(0),
        );
        let what = if g["summarised"].as_bool() == Some(true) {
            "gap (summarised)"
        } else {
            "gap"
        };
        lines.push(vec![
            a.to_string(),
            utc(a),
            what.into(),
            format!("until {}", utc(b)),
        ]);
    }
    lines.sort_by_key(|l| l[0].parse::<u64>().unwrap_or(0));
    let mut head = vec!["time_ms", "time", "kind", "value"];
    if stepped {
        head.extend(["count", "min", "max"]);
    }
    Ok(match output {
        "json" => format!("{}\n", serde_json::to_string_pretty(v)?),
        "csv" => {
            let mut out = format!("{}\n", head.join(","));
            for l in lines {
                out.push_str(&l.into_iter().map(csv).collect::<Vec<_>>().join(","));
                out.push('\n');
            }
            out
        }
        "table" => {
            let mut all = vec![head.iter().map(|h| h.to_uppercase()).collect::<Vec<_>>()];
            all.extend(lines);
            let cols = all.iter().map(Vec::len).max().unwrap_or(0);
            let widths: Vec<usize> = (0..cols)
                .map(|c| {
                    all.iter()
                        .filter_map(|l| l.get(c))
                        .map(|x| x.chars().count())
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let mut out = String::new();
            for l in all {
                let cells: Vec<String> = l
                    .iter()
                    .enumerate()
                    .map(|(i, x)| format!("{x:<w$}", w = widths[i]))
                    .collect();
                out.push_str(cells.join("  ").trim_end());
                out.push('\n');
            }
            let truncated = v["truncated"].as_bool() == Some(true);
            out.push_str(&format!(
                "{} records{}\n",
                v["records"].as_u64().unwrap_or(0),
                if truncated {
                    " (more in the range: narrow it)"
                } else {
                    ""
                }
            ));
            out
        }
        other => bail!("unknown output {other:?}: expected table, csv or json"),
    })
}

/// A TLS configuration that trusts exactly the CA certificates of `pem`.
pub fn trusting(pem: &[u8]) -> anyhow::Result<ureq::tls::TlsConfig> {
    let certs: Vec<_> = ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        bail!("holds no PEM certificate");
    }
    Ok(ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
        .build())
}

/// `ms` since the epoch as UTC, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn utc(ms: u64) -> String {
    daemon::render::utc(ms, true)
}

/// Percent-encodes a path segment.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points, summaries and gaps each have their rows, by time, in csv
    /// and table; csv quotes a value with a comma.
    #[test]
    fn series_as_text() {
        let v = serde_json::json!({
            "step": 0, "records": 2, "truncated": false,
            "points": [{"t": 1000, "v": 1.5}, {"t": 90_000, "v": {"a": 1, "b": 2}}],
            "summaries": [{"t": 60_000, "summary": {"count": 3, "min": 1, "max": 2, "mean": 1.5, "first_ms": 60_000, "last_ms": 62_000}}],
            "gaps": [{"from": 1000, "to": 90_000, "summarised": true}],
        });
        let csv = render_series(&v, "csv").unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "time_ms,time,kind,value");
        assert_eq!(lines[1], "1000,1970-01-01T00:00:01.000Z,record,1.5");
        assert!(lines[2].starts_with("1000,1970-01-01T00:00:01.000Z,gap (summarised),until "));
        assert!(lines[3].starts_with("60000,1970-01-01T00:01:00.000Z,summary,1.5,count=3"));
        assert_eq!(
            lines[4],
            "90000,1970-01-01T00:01:30.000Z,record,\"{\"\"a\"\":1,\"\"b\"\":2}\""
        );
        let table = render_series(&v, "table").unwrap();
        assert!(table.starts_with("TIME_MS"), "{table}");
        assert!(table.ends_with("2 records\n"), "{table}");
        assert!(render_series(&v, "xml").is_err());
    }
}
