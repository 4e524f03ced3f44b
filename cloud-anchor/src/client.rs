//! The CLI's side of the API: `shoal apply|get|delete --anchor URL --token T`.
//! Answers are the text the same verbs print on a local data dir.

use std::time::Duration;

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
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            agent,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let resp = match (method, body) {
            ("POST", Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(b.as_bytes()),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            _ => self.agent.get(&url).header("Authorization", &auth).call(),
        };
        let mut resp = resp.map_err(|e| anyhow!("{url}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .map_err(|e| anyhow!("{url}: {e}"))?;
        if status >= 400 {
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            if status == 401 {
                bail!("the anchor refused the token ({status}): {msg}");
            }
            bail!("the anchor answered {status}: {msg}");
        }
        Ok(text)
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

    /// `shoal delete KIND NAME`.
    pub fn delete(&self, kind: &str, name: &str) -> anyhow::Result<String> {
        let kinds = match crdt_state::fleet::model::Kind::parse(kind) {
            Some(crdt_state::fleet::model::Kind::App) => "apps",
            Some(crdt_state::fleet::model::Kind::Config) => "configs",
            Some(crdt_state::fleet::model::Kind::Node) => "nodes",
            Some(crdt_state::fleet::model::Kind::SiteOverride) => "sites",
            Some(crdt_state::fleet::model::Kind::DeviceProfile) => "profiles",
            Some(crdt_state::fleet::model::Kind::Device) => "devices",
            Some(crdt_state::fleet::model::Kind::Artifact) => "artifacts",
            None => bail!("unknown kind {kind:?}: expected app, config, node or site"),
        };
        self.call("DELETE", &format!("/api/{kinds}/{}", encode(name)), None)?;
        Ok(format!("{}/{name} deleted\n", kinds.trim_end_matches('s')))
    }
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
