//! A scripted tour of the foundation: a fleet with two sites, a field
//! engineer who edits her site with the uplink down, bundles carried by
//! hand, a merge with a surfaced conflict, and a forged bundle refused.
//! Every step runs the real code on real redb files.

use std::io::Write;
use std::path::Path;

use crdt_state::fleet::model::FleetView;
use crdt_state::fleet::placement::share;
use crdt_state::{DataDir, DocId, Error, Role, fleet::manifest, fleet::model};
use daemon::render::{self, Format};

/// The fleet the tour declares.
pub const FLEET: &str = r#"apiVersion: shoal.dev/v1
kind: App
metadata: { name: meter-reader }
spec:
  selector: { role: meter }
  version: v2
  native:
    command: ["/usr/bin/python3", "-m", "http.server", "8080"]
    env: { POLL_SECONDS: "5" }
    files: { "reader.ini": { config: thresholds } }
---
apiVersion: shoal.dev/v1
kind: App
metadata: { name: breaker-watch }
spec:
  replicas: 1
  selector: { site: north }
  native: { command: ["/bin/sleep", "infinity"] }
---
apiVersion: shoal.dev/v1
kind: Config
metadata: { name: thresholds }
spec: { data: { max_kv: "11.5", min_kv: "10.5" } }
---
apiVersion: shoal.dev/v1
kind: Node
metadata: { name: north-1 }
spec: { site: north, labels: { role: meter } }
---
apiVersion: shoal.dev/v1
kind: Node
metadata: { name: north-2 }
spec: { site: north, labels: { role: meter } }
---
apiVersion: shoal.dev/v1
kind: Node
metadata: { name: south-1 }
spec: { site: south, labels: { role: meter } }
---
apiVersion: shoal.dev/v1
kind: Node
metadata: { name: south-2 }
spec: { site: south }
"#;

fn site_override(version: &str, max_kv: Option<&str>) -> String {
    let mut s = format!(
        "apiVersion: shoal.dev/v1\nkind: SiteOverride\nmetadata: {{ name: north }}\nspec:\n  apps: {{ meter-reader: {{ version: {version} }} }}\n"
    );
    if let Some(v) = max_kv {
        s.push_str(&format!(
            "  configs: {{ thresholds: {{ data: {{ max_kv: \"{v}\" }} }} }}\n"
        ));
    }
    s
}

fn shares(out: &mut dyn Write, fleet: &FleetView, dd: &DataDir) -> Result<(), Error> {
    for (node, spec) in &fleet.nodes {
        let site = dd.doc(&DocId::Site(spec.site.clone()))?;
        let site = model::read_site(&site);
        let work = share(fleet, Some(&site), node, &|_| true);
        let apps: Vec<String> = work
            .iter()
            .map(|w| format!("{}@{}", w.app, w.spec.version.as_deref().unwrap_or("-")))
            .collect();
        let _ = writeln!(out, "  {node:<8} ({}) runs: {}", spec.site, apps.join(", "));
    }
    Ok(())
}

/// Runs the tour in `dir` (which must not hold a fleet), narrating to `out`.
pub fn run(dir: &Path, out: &mut dyn Write) -> Result<(), Error> {
    let step = |out: &mut dyn Write, s: &str| {
        let _ = writeln!(out, "\n== {s}");
    };
    let op_dir = dir.join("operator");
    let eng_dir = dir.join("north-laptop");
    let now = 1_700_000_000;

    step(
        out,
        "An operator creates the fleet (root key, first operator identity)",
    );
    let mut op = DataDir::init(&op_dir, "grid", now)?;
    let _ = writeln!(
        out,
        "  fleet root {}  data dir {}",
        op.trust().root().short(),
        op_dir.display()
    );

    step(
        out,
        "The operator declares apps, a config and four nodes in two sites",
    );
    let applied = op.apply(&manifest::parse("fleet.yaml", FLEET)?, now)?;
    let _ = write!(out, "{}", render::applied(Format::Table, &applied));
    let _ = write!(out, "{}", render::apps(Format::Table, &op.fleet()?));

    step(
        out,
        "Each node computes its own share (selectors, rendezvous hashing)",
    );
    shares(out, &op.fleet()?, &op)?;

    step(
        out,
        "A field engineer of site north gets an identity and a bundle on a USB stick",
    );
    let eve = op.create_identity(Role::SiteEngineer, Some("north"), "eve", now)?;
    let eve_file = dir.join("eve.identity.json");
    eve.write(&eve_file)?;
    let mut eng = DataDir::use_identity(&eng_dir, &eve_file)?;
    let r = eng.import(&op.export()?)?;
    let _ = writeln!(out, "  imported and verified: {:?}", r.new_changes);

    step(out, "The uplink is down. Both sides edit site north");
    op.apply(
        &manifest::parse("op.yaml", &site_override("v3-hotfix", None))?,
        now + 60,
    )?;
    let _ = writeln!(out, "  operator:  meter-reader version v3-hotfix at north");
    eng.apply(
        &manifest::parse("eve.yaml", &site_override("v1", Some("11.8")))?,
        now + 90,
    )?;
    let _ = writeln!(
        out,
        "  engineer:  meter-reader rolled back to v1, max_kv 11.8 at north"
    );
    let edited_fleet = FLEET.replace("version: v2", "version: v9");
    let denied = eng.apply(&manifest::parse("eve.yaml", &edited_fleet)?, now + 90);
    if let Err(e) = denied {
        let _ = writeln!(out, "  engineer tries to edit the fleet: refused ({e})");
    }

    step(
        out,
        "The uplink returns: bundles both ways, every signature verified",
    );
    let from_op = op.export()?;
    let from_eng = eng.export()?;
    eng.import(&from_op)?;
    op.import(&from_eng)?;
    let north = |dd: &DataDir| -> Result<String, Error> {
        let s = model::read_site(&dd.doc(&DocId::Site("north".into()))?);
        Ok(format!(
            "version {:?}, max_kv {:?}",
            s.apps.get("meter-reader").and_then(|a| a.version.clone()),
            s.configs
                .get("thresholds")
                .and_then(|c| c.data.get("max_kv").cloned())
        ))
    };
    let _ = writeln!(out, "  operator sees: {}", north(&op)?);
    let _ = writeln!(out, "  engineer sees: {}", north(&eng)?);
    step(
        out,
        "Different fields merged; the one field both changed is a surfaced conflict",
    );
    let _ = write!(
        out,
        "{}",
        render::conflicts(Format::Table, &op.conflicts()?)
    );
    shares(out, &op.fleet()?, &op)?;

    step(out, "A relay flips one byte of a bundle: refused whole");
    let mut forged = from_op.clone();
    let at = forged.len() - 80;
    forged[at] ^= 0x01;
    match eng.import(&forged) {
        Err(e) => {
            let _ = writeln!(out, "  {e}");
        }
        Ok(_) => {
            let _ = writeln!(out, "  !! a forged bundle was accepted");
        }
    }
    let _ = writeln!(
        out,
        "\nDone. Inspect with: shoal get conflicts --data-dir {}",
        op_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tour_runs_and_shows_the_merge() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::new();
        run(tmp.path(), &mut out).unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("apps.meter-reader.version"), "{text}");
        assert!(text.contains("max_kv Some(\"11.8\")"), "{text}");
        assert!(!text.contains("site.name"), "{text}");
        assert!(text.contains("may not write fleet"), "{text}");
        assert!(text.contains("bundle refused"), "{text}");
        assert!(!text.contains("!!"), "{text}");
    }
}
