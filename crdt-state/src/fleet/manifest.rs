//! Manifests: Kubernetes-style YAML that operators and site engineers write.
//!
//! ```yaml
//! apiVersion: shoal.dev/v1
//! kind: App
//! metadata: { name: inspect }
//! spec:
//!   selector: { site: a }
//!   native: { command: ["/usr/bin/inspect", "--port", "8080"] }
//! ```
//!
//! Several documents per file, separated by `---`. Every field is checked;
//! an error names the file, the document's position, the field and what was
//! expected.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::fleet::model::{
    AppSpec, ArtifactSpec, ConfigSpec, Kind, NodeSpec, RuntimeKind, SiteOverrideSpec, validate_name,
};

/// The only API version so far.
pub const API_VERSION: &str = "shoal.dev/v1";

/// Largest manifest file accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A manifest that could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// The file (or `-` for standard input).
    pub file: String,
    /// 1-based position of the YAML document in the file (0: the file itself).
    pub document: usize,
    /// Dotted path of the field at fault (empty for the whole document).
    pub field: String,
    /// What was wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What a manifest declares.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    /// An app.
    App(Box<AppSpec>),
    /// A config.
    Config(ConfigSpec),
    /// A node registry entry.
    Node(NodeSpec),
    /// A site's overrides.
    SiteOverride(SiteOverrideSpec),
    /// A device profile.
    DeviceProfile(crate::fleet::device::DeviceProfileSpec),
    /// A device.
    Device(Box<crate::fleet::device::DeviceSpec>),
    /// An artifact.
    Artifact(ArtifactSpec),
}

/// One parsed and validated manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// `metadata.name`.
    pub name: String,
    /// The spec.
    pub spec: Spec,
    /// 1-based position in its file.
    pub document: usize,
}

impl Manifest {
    /// The kind.
    pub fn kind(&self) -> Kind {
        match self.spec {
            Spec::App(_) => Kind::App,
            Spec::Config(_) => Kind::Config,
            Spec::Node(_) => Kind::Node,
            Spec::SiteOverride(_) => Kind::SiteOverride,
            Spec::DeviceProfile(_) => Kind::DeviceProfile,
            Spec::Device(_) => Kind::Device,
            Spec::Artifact(_) => Kind::Artifact,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Envelope {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: serde_yaml::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: BTreeMap<String, String>,
}

/// Parses every manifest in `text`; `file` names the source in errors.
pub fn parse(file: &str, text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let err = |document: usize, field: &str, message: String| ManifestError {
        file: file.to_string(),
        document,
        field: field.to_string(),
        message,
    };
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(err(
            0,
            "",
            format!(
                "file is {} bytes, more than the {} allowed",
                text.len(),
                MAX_MANIFEST_BYTES
            ),
        ));
    }
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = serde_yaml::Value::deserialize(de)
            .map_err(|e| err(n, "", format!("not valid YAML: {e}")))?;
        if value.is_null() {
            continue; // an empty document, e.g. a leading `---`
        }
        let env: Envelope = serde_path_to_error::deserialize(value)
            .map_err(|e| err(n, &path_of(e.path()), inner_message(e.inner())))?;
        if env.api_version != API_VERSION {
            return Err(err(
                n,
                "apiVersion",
                format!(
                    "{:?} is not supported: expected {API_VERSION}",
                    env.api_version
                ),
            ));
        }
        let kind = match env.kind.as_str() {
            "App" => Kind::App,
            "Config" => Kind::Config,
            "Node" => Kind::Node,
            "SiteOverride" => Kind::SiteOverride,
            "DeviceProfile" => Kind::DeviceProfile,
            "Device" => Kind::Device,
            "Artifact" => Kind::Artifact,
            other => {
                return Err(err(
                    n,
                    "kind",
                    format!(
                        "unknown kind {other:?}: expected App, Config, Node, SiteOverride, DeviceProfile, Device or Artifact"
                    ),
                ));
            }
        };
        validate_name(kind.as_str(), &env.metadata.name).map_err(|m| err(n, "metadata.name", m))?;
        let spec = match kind {
            Kind::App => Spec::App(Box::new(typed(env.spec).map_err(|(f, m)| err(n, &f, m))?)),
            Kind::Config => Spec::Config(typed(env.spec).map_err(|(f, m)| err(n, &f, m))?),
            Kind::Node => Spec::Node(typed(env.spec).map_err(|(f, m)| err(n, &f, m))?),
            Kind::SiteOverride => {
                Spec::SiteOverride(typed(env.spec).map_err(|(f, m)| err(n, &f, m))?)
            }
            Kind::DeviceProfile => {
                Spec::DeviceProfile(typed(env.spec).map_err(|(f, m)| err(n, &f, m))?)
            }
            Kind::Device => {
                Spec::Device(Box::new(typed(env.spec).map_err(|(f, m)| err(n, &f, m))?))
            }
            Kind::Artifact => Spec::Artifact(typed(env.spec).map_err(|(f, m)| err(n, &f, m))?),
        };
        validate(&env.metadata.name, &spec).map_err(|(f, m)| err(n, &format!("spec.{f}"), m))?;
        if out
            .iter()
            .any(|m: &Manifest| m.kind() == kind && m.name == env.metadata.name)
        {
            return Err(err(
                n,
                "metadata.name",
                format!(
                    "{} {} is declared twice in this file",
                    kind.as_str(),
                    env.metadata.name
                ),
            ));
        }
        out.push(Manifest {
            name: env.metadata.name,
            spec,
            document: n,
        });
    }
    Ok(out)
}

fn typed<T: for<'de> Deserialize<'de>>(v: serde_yaml::Value) -> Result<T, (String, String)> {
    let v = if v.is_null() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        v
    };
    serde_path_to_error::deserialize(v).map_err(|e| {
        let p = path_of(e.path());
        let field = if p.is_empty() {
            "spec".to_string()
        } else {
            format!("spec.{p}")
        };
        (field, inner_message(e.inner()))
    })
}

fn path_of(p: &serde_path_to_error::Path) -> String {
    let s = p.to_string();
    if s == "." { String::new() } else { s }
}

fn inner_message(e: &serde_yaml::Error) -> String {
    // serde_yaml prefixes the location of the value inside the converted
    // tree, which means nothing to the author of the file; keep the message.
    let s = e.to_string();
    match s.split_once(" at line ") {
        Some((msg, _)) => msg.to_string(),
        None => s,
    }
}

type Invalid = (String, String);

fn validate(name: &str, spec: &Spec) -> Result<(), Invalid> {
    match spec {
        Spec::App(app) => validate_app(name, app),
        Spec::Config(c) => {
            for k in c.data.keys() {
                check_key("data", k)?;
            }
            Ok(())
        }
        Spec::Node(n) => {
            validate_name("site", &n.site).map_err(|m| ("site".into(), m))?;
            check_labels("labels", &n.labels)
        }
        Spec::DeviceProfile(p) => crate::fleet::device::validate_profile(p),
        Spec::Device(d) => crate::fleet::device::validate_device(d),
        Spec::Artifact(a) => validate_artifact(a),
        Spec::SiteOverride(s) => {
            for dev in s.devices.keys() {
                validate_name("device", dev).map_err(|m| (format!("devices.{dev}"), m))?;
            }
            for (app, o) in &s.apps {
                validate_name("app", app).map_err(|m| (format!("apps.{app}"), m))?;
                for k in o.env.keys() {
                    check_env(&format!("apps.{app}.env"), k)?;
                }
            }
            for (cfg, o) in &s.configs {
                validate_name("config", cfg).map_err(|m| (format!("configs.{cfg}"), m))?;
                for k in o.data.keys() {
                    check_key(&format!("configs.{cfg}.data"), k)?;
                }
            }
            Ok(())
        }
    }
}

/// Largest artifact (1 TiB, what the blob protocol carries).
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 40;

fn validate_artifact(a: &ArtifactSpec) -> Result<(), Invalid> {
    if a.hash.len() != 64
        || !a
            .hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err((
            "hash".into(),
            format!(
                "{:?} is not a BLAKE3 hash: expected 64 lowercase hex digits (`b3sum FILE`, or let `shoal artifact push` write it)",
                a.hash.chars().take(80).collect::<String>()
            ),
        ));
    }
    if a.size > MAX_ARTIFACT_BYTES {
        return Err((
            "size".into(),
            format!(
                "{} bytes is more than the {MAX_ARTIFACT_BYTES} allowed",
                a.size
            ),
        ));
    }
    if let Some(m) = &a.media_type
        && !is_media_type(m)
    {
        return Err((
            "mediaType".into(),
            format!("{m:?} is not a media type like application/octet-stream"),
        ));
    }
    if let Some(d) = &a.description
        && d.chars().count() > 4096
    {
        return Err(("description".into(), "longer than 4096 characters".into()));
    }
    Ok(())
}

/// What an artifact's media type may be: at most 255 characters with a
/// `/`, no white space (nor U+FEFF), no control characters and no U+FFFE
/// or U+FFFF (the operator API's document says the same as a pattern).
pub fn is_media_type(m: &str) -> bool {
    m.chars().count() <= 255
        && m.contains('/')
        && !m.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '\u{feff}' | '\u{fffe}' | '\u{ffff}')
        })
}

/// A one-line text the operator API takes in a query (an artifact's
/// description): at most `max` characters, no control characters, no
/// U+FFFE or U+FFFF (which YAML does not allow).
pub fn is_line(d: &str, max: usize) -> bool {
    d.chars().count() <= max
        && !d
            .chars()
            .any(|c| c.is_control() || matches!(c, '\u{fffe}' | '\u{ffff}'))
}

/// An app's name for an artifact becomes an environment variable
/// (`SHOAL_ARTIFACT_<NAME>`) and a file name: letters, digits, `-`, `_`.
fn check_artifact_refs(app: &AppSpec) -> Result<(), Invalid> {
    for (local, artifact) in &app.artifacts {
        let field = format!("artifacts.{local}");
        if local.is_empty()
            || local.len() > 63
            || !local
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err((
                field,
                "expected a name of letters, digits, - and _ (it becomes SHOAL_ARTIFACT_<NAME>)"
                    .into(),
            ));
        }
        validate_name("artifact", artifact).map_err(|m| (field, m))?;
    }
    Ok(())
}

fn validate_app(name: &str, app: &AppSpec) -> Result<(), Invalid> {
    check_labels("selector", &app.selector)?;
    check_artifact_refs(app)?;
    if let Some(r) = &app.rollout {
        crate::fleet::rollout::validate(r)?;
    }
    if let Some(r) = app.replicas
        && r > 100_000
    {
        return Err(("replicas".into(), format!("{r} is more than 100000")));
    }
    match app.runtime {
        RuntimeKind::Native => {
            let native = app.native.as_ref().ok_or((
                "native".to_string(),
                "missing: a native app needs native.command".to_string(),
            ))?;
            if app.kube.is_some() {
                return Err(("kube".into(), "not allowed with runtime: native".into()));
            }
            if native.command.is_empty() || native.command[0].is_empty() {
                return Err((
                    "native.command".into(),
                    "must name a program: expected a list like [\"/usr/bin/app\", \"--flag\"]"
                        .into(),
                ));
            }
            for k in native.env.keys() {
                check_env("native.env", k)?;
            }
            for (path, src) in &native.files {
                check_relative_path(&format!("native.files.{path}"), path)?;
                validate_name("config", &src.config)
                    .map_err(|m| (format!("native.files.{path}.config"), m))?;
            }
            if let Some(h) = &native.health {
                let kinds = [h.http.is_some(), h.tcp.is_some(), !h.exec.is_empty()];
                if kinds.iter().filter(|k| **k).count() != 1 {
                    return Err((
                        "native.health".into(),
                        "needs exactly one of http, tcp or exec".into(),
                    ));
                }
                if let Some(u) = &h.http
                    && !u.starts_with("http://")
                {
                    return Err((
                        "native.health.http".into(),
                        format!("{u:?} is not an http:// URL"),
                    ));
                }
                if h.period_s == 0 || h.timeout_s == 0 || h.failures == 0 {
                    return Err((
                        "native.health".into(),
                        "period_s, timeout_s and failures must be positive".into(),
                    ));
                }
            }
            Ok(())
        }
        RuntimeKind::Kube => {
            let kube = app.kube.as_ref().ok_or((
                "kube".to_string(),
                "missing: a kube app needs kube.manifests".to_string(),
            ))?;
            if app.native.is_some() {
                return Err(("native".into(), "not allowed with runtime: kube".into()));
            }
            if let Some(ns) = &kube.namespace {
                validate_name("namespace", ns).map_err(|m| ("kube.namespace".into(), m))?;
            } else if name.len() + "shoal-".len() > 63 {
                return Err((
                    "kube.namespace".into(),
                    format!(
                        "missing: the default, shoal-{name}, is longer than a Kubernetes \
                         namespace may be (63); name one"
                    ),
                ));
            }
            let mut count = 0;
            for (i, de) in serde_yaml::Deserializer::from_str(&kube.manifests).enumerate() {
                let v = serde_yaml::Value::deserialize(de).map_err(|e| {
                    (
                        format!("kube.manifests[{i}]"),
                        format!("not valid YAML: {e}"),
                    )
                })?;
                if v.is_null() {
                    continue;
                }
                for field in ["apiVersion", "kind"] {
                    if !v.get(field).is_some_and(|f| f.is_string()) {
                        return Err((
                            format!("kube.manifests[{i}].{field}"),
                            "missing: every Kubernetes object needs apiVersion and kind".into(),
                        ));
                    }
                }
                if !v
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .is_some_and(|n| n.is_string())
                {
                    return Err((
                        format!("kube.manifests[{i}].metadata.name"),
                        "missing: every Kubernetes object needs a name".into(),
                    ));
                }
                let ns = kube
                    .namespace
                    .clone()
                    .unwrap_or_else(|| format!("shoal-{name}"));
                let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
                let meta = |k: &str| {
                    v.get("metadata")
                        .and_then(|m| m.get(k))
                        .and_then(|x| x.as_str())
                };
                if let Some((field, msg)) = kube_object_problem(
                    &ns,
                    text("apiVersion"),
                    text("kind"),
                    meta("name").unwrap_or(""),
                    meta("namespace"),
                ) {
                    return Err((format!("kube.manifests[{i}].{field}"), msg));
                }
                count += 1;
            }
            if count == 0 {
                return Err(("kube.manifests".into(), "holds no Kubernetes object".into()));
            }
            Ok(())
        }
    }
}

/// What is wrong, if anything, with a Kubernetes object of a kube app whose
/// namespace is `ns`: a `Namespace` object (the app's namespace is its own
/// setting, created by Shoal when missing), or a `metadata.namespace`
/// naming another namespace (Shoal never moves an object silently). The
/// field at fault and the words. Checked at `shoal apply` and again by the
/// node before it applies anything.
pub fn kube_object_problem(
    ns: &str,
    api_version: &str,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
) -> Option<(&'static str, String)> {
    if kind == "Namespace" && api_version == "v1" {
        return Some((
            "kind",
            format!(
                "Namespace {name}: an app's namespace is spec.kube.namespace ({ns}), which Shoal \
                 creates when it is missing; remove this object"
            ),
        ));
    }
    match namespace {
        Some(other) if other != ns => Some((
            "metadata.namespace",
            format!(
                "{kind} {name} names namespace {other}, but the app's objects live in {ns}: \
                 remove metadata.namespace or set spec.kube.namespace"
            ),
        )),
        _ => None,
    }
}

fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), Invalid> {
    for (k, v) in labels {
        let (prefix, name) = k.rsplit_once('/').unwrap_or(("", k));
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        let prefix_ok = prefix.len() <= 253
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
        if !name_ok || !prefix_ok || (k.contains('/') && prefix.is_empty()) {
            return Err((
                format!("{field}.{k}"),
                "is not a valid label key: expected [prefix/]name with name of 1-63 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if v.len() > 63
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err((
                format!("{field}.{k}"),
                format!(
                    "{v:?} is not a valid label value: expected at most 63 letters, digits, '-', '_' or '.'"
                ),
            ));
        }
    }
    Ok(())
}

fn check_env(field: &str, k: &str) -> Result<(), Invalid> {
    let ok = !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err((
            format!("{field}.{k}"),
            "is not a valid environment variable name: expected letters, digits and '_', not starting with a digit".into(),
        ))
    }
}

fn check_key(field: &str, k: &str) -> Result<(), Invalid> {
    if k.is_empty() || k.len() > 253 || k.chars().any(char::is_control) {
        return Err((
            format!("{field}.{k}"),
            "is not a valid key: expected 1-253 printable characters".into(),
        ));
    }
    Ok(())
}

fn check_relative_path(field: &str, p: &str) -> Result<(), Invalid> {
    let bad = p.is_empty()
        || p.starts_with('/')
        || p.split('/').any(|c| c == ".." || c.is_empty())
        || p.contains('\0')
        || p.len() > 255;
    if bad {
        return Err((
            field.into(),
            "must be a relative path inside the app directory (no '/', '..' or empty parts at the start)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: shoal.dev/v1
kind: App
metadata: { name: inspect }
spec:
  selector: { site: a }
  replicas: 2
  native:
    command: ["/bin/sleep", "1000"]
    env: { MODE: fast }
    files: { "conf/app.ini": { config: inspect-cfg } }
---
apiVersion: shoal.dev/v1
kind: Config
metadata: { name: inspect-cfg }
spec: { data: { threshold: "7" } }
---
apiVersion: shoal.dev/v1
kind: Node
metadata: { name: n1 }
spec: { site: a, labels: { zone: north } }
---
apiVersion: shoal.dev/v1
kind: SiteOverride
metadata: { name: a }
spec: { apps: { inspect: { paused: true } } }
"#;

    #[test]
    fn parses_every_kind() -> anyhow::Result<()> {
        let ms = parse("good.yaml", GOOD)?;
        let kinds: Vec<_> = ms.iter().map(Manifest::kind).collect();
        assert_eq!(
            kinds,
            [Kind::App, Kind::Config, Kind::Node, Kind::SiteOverride]
        );
        let Spec::App(app) = &ms[0].spec else {
            anyhow::bail!("not an app")
        };
        assert_eq!(app.replicas, Some(2));
        Ok(())
    }

    fn error_of(text: &str) -> ManifestError {
        match parse("f.yaml", text) {
            Err(e) => e,
            Ok(m) => panic!("accepted: {m:?}"),
        }
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let text = GOOD.replace("replicas: 2", "replicas: two");
        let e = error_of(&text);
        assert_eq!((e.document, e.field.as_str()), (1, "spec.replicas"));
        assert!(
            e.to_string()
                .starts_with("f.yaml: document 1: spec.replicas: "),
            "{e}"
        );

        let e = error_of(&GOOD.replace("command: [\"/bin/sleep\", \"1000\"]", "comand: [x]"));
        assert_eq!(e.field, "spec.native.comand");
        assert!(
            e.message.contains("unknown field `comand`"),
            "{}",
            e.message
        );

        let e = error_of(&GOOD.replace("kind: Config", "kind: Konfig"));
        assert_eq!((e.document, e.field.as_str()), (2, "kind"));

        let e = error_of(&GOOD.replace("name: n1", "name: N_1"));
        assert_eq!((e.document, e.field.as_str()), (3, "metadata.name"));

        let e = error_of(&GOOD.replace("conf/app.ini", "../../etc/passwd"));
        assert_eq!(e.field, "spec.native.files.../../etc/passwd");

        let e = error_of(&GOOD.replace("shoal.dev/v1\nkind: Node", "v2\nkind: Node"));
        assert_eq!((e.document, e.field.as_str()), (3, "apiVersion"));

        let e = error_of("a: [unclosed");
        assert_eq!(e.document, 1);
        assert!(e.message.contains("not valid YAML"));
    }

    const ARTIFACT: &str = r#"apiVersion: shoal.dev/v1
kind: Artifact
metadata: { name: model-v3 }
spec:
  size: 524288000
  hash: 0f3a1d7c9e4b2a6f8d0c1e3b5a7f9d2c4e6a8b0d1f3e5c7a9b2d4f6e8a0c1e3b
  mediaType: application/onnx
  description: defect detector, v3
---
apiVersion: shoal.dev/v1
kind: App
metadata: { name: inspect }
spec:
  native: { command: ["/usr/bin/inspect"] }
  artifacts: { model: model-v3 }
"#;

    #[test]
    fn artifacts_and_the_apps_that_read_them() -> anyhow::Result<()> {
        let ms = parse("a.yaml", ARTIFACT)?;
        let Spec::Artifact(a) = &ms[0].spec else {
            anyhow::bail!("not an artifact")
        };
        assert_eq!(a.size, 524_288_000);
        assert_eq!(a.media_type.as_deref(), Some("application/onnx"));
        let Spec::App(app) = &ms[1].spec else {
            anyhow::bail!("not an app")
        };
        assert_eq!(app.artifacts["model"], "model-v3");
        // A hash that is not BLAKE3's hex, named with how to get one.
        let e = error_of(&ARTIFACT.replace("0f3a1d7c", "0F3A1D7C"));
        assert_eq!((e.document, e.field.as_str()), (1, "spec.hash"));
        assert!(e.message.contains("b3sum"), "{}", e.message);
        let e = error_of(&ARTIFACT.replace("size: 524288000", "size: -1"));
        assert_eq!(e.field, "spec.size");
        let e = error_of(&ARTIFACT.replace("application/onnx", "onnx"));
        assert_eq!(e.field, "spec.mediaType");
        // An app's name for an artifact becomes an environment variable.
        let e = error_of(&ARTIFACT.replace("{ model: model-v3 }", "{ \"my model\": model-v3 }"));
        assert_eq!(
            (e.document, e.field.as_str()),
            (2, "spec.artifacts.my model")
        );
        let e = error_of(&ARTIFACT.replace("{ model: model-v3 }", "{ model: Model_V3 }"));
        assert_eq!(e.field, "spec.artifacts.model");
        Ok(())
    }

    #[test]
    fn kube_objects_stay_in_the_apps_namespace() {
        let yaml = r#"apiVersion: shoal.dev/v1
kind: App
metadata: {name: web}
spec:
  runtime: kube
  kube: { manifests: "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: kube-system}\n" }
"#;
        let e = error_of(yaml);
        assert_eq!(e.field, "spec.kube.manifests[0].metadata.namespace");
        assert!(e.message.contains("shoal-web"), "{}", e.message);
        let ok = yaml.replace("kube-system", "shoal-web");
        assert!(parse("a.yaml", &ok).is_ok());
        let e = error_of(&yaml.replace(
            "kind: ConfigMap\\nmetadata: {name: c, namespace: kube-system}",
            "kind: Namespace\\nmetadata: {name: c}",
        ));
        assert_eq!(e.field, "spec.kube.manifests[0].kind");
        let long = "a".repeat(60);
        let e = error_of(&ok.replace("{name: web}", &format!("{{name: {long}}}")));
        assert_eq!(e.field, "spec.kube.namespace");
    }

    #[test]
    fn kube_apps_need_objects() {
        let text = r#"
apiVersion: shoal.dev/v1
kind: App
metadata: { name: web }
spec:
  runtime: kube
  kube: { manifests: "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n" }
"#;
        let e = error_of(text);
        assert_eq!(e.field, "spec.kube.manifests[0].metadata.name");
    }
}
