//! Data directories end to end: real redb files, bundles both ways,
//! conflicts, authority, corrupt stores.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;

use crdt_state::fleet::manifest;
use crdt_state::fleet::model::Kind;
use crdt_state::local::datadir::{IDENTITY_FILE, STORE_FILE};
use crdt_state::{DataDir, DocId, Error, Role, Store, StoreConfig};

const APP: &str = r#"
apiVersion: shoal.dev/v1
kind: App
metadata: { name: inspect }
spec:
  selector: { site: a }
  version: v1
  native: { command: ["/bin/sleep", "1000"] }
---
apiVersion: shoal.dev/v1
kind: Node
metadata: { name: n1 }
spec: { site: a }
"#;

fn site_override(paused: bool, version: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: SiteOverride\nmetadata: {{ name: a }}\nspec: {{ apps: {{ inspect: {{ paused: {paused}, version: {version} }} }} }}\n"
    )
}

fn apply(dd: &mut DataDir, text: &str) -> usize {
    let ms = manifest::parse("t.yaml", text).unwrap();
    dd.apply(&ms, 1).unwrap().iter().map(|a| a.fields).sum()
}

/// An operator data dir and a site engineer's, both holding the fleet.
fn two_copies(tmp: &Path) -> (DataDir, DataDir) {
    let mut op = DataDir::init(&tmp.join("op"), "grid", 1).unwrap();
    apply(&mut op, APP);
    apply(&mut op, &site_override(false, "v1"));
    let eve = op
        .create_identity(Role::SiteEngineer, Some("a"), "eve", 1)
        .unwrap();
    eve.write(&tmp.join("eve.json")).unwrap();
    let mut eng = DataDir::use_identity(&tmp.join("eng"), &tmp.join("eve.json")).unwrap();
    let report = eng.import(&op.export().unwrap()).unwrap();
    assert_eq!(report.waiting, 0);
    assert!(report.new_changes.contains_key("fleet"));
    (op, eng)
}

#[test]
fn same_site_field_edited_on_both_sides_shows_one_winner_and_the_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut op, mut eng) = two_copies(tmp.path());
    // Cut off from each other, both edit the same field of site/a.
    assert_eq!(apply(&mut op, &site_override(false, "v2")), 1);
    assert_eq!(apply(&mut eng, &site_override(false, "v0-rollback")), 1);
    // Exchange bundles both ways (USB stick).
    let from_op = op.export().unwrap();
    let from_eng = eng.export().unwrap();
    assert_eq!(
        eng.import(&from_op).unwrap().new_changes.get("site/a"),
        Some(&1)
    );
    assert_eq!(
        op.import(&from_eng).unwrap().new_changes.get("site/a"),
        Some(&1)
    );
    let site = DocId::Site("a".into());
    let v_op = op.doc(&site).unwrap().get("apps.inspect.version");
    let v_eng = eng.doc(&site).unwrap().get("apps.inspect.version");
    assert_eq!(v_op, v_eng);
    for dd in [&op, &eng] {
        let conflicts = dd.conflicts().unwrap();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        let c = &conflicts[0];
        assert_eq!(
            (c.doc.as_str(), c.field.as_str()),
            ("site/a", "apps.inspect.version")
        );
        let mut writers: Vec<_> = c
            .values
            .iter()
            .map(|v| (v.writer.clone(), v.value.clone()))
            .collect();
        writers.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            writers,
            vec![
                ("admin".to_string(), serde_json::json!("v2")),
                ("eve".to_string(), serde_json::json!("v0-rollback")),
            ]
        );
        assert_eq!(c.values.iter().filter(|v| v.winner).count(), 1);
        let winner = c.values.iter().find(|v| v.winner).unwrap();
        assert_eq!(Some(winner.value.clone()), v_op);
    }
    assert_eq!(op.conflicts().unwrap(), eng.conflicts().unwrap());
    // An operator resolves it with a normal edit, even to the winning value.
    let winning = v_op.unwrap();
    apply(&mut op, &site_override(false, winning.as_str().unwrap()));
    assert!(op.conflicts().unwrap().is_empty());
    eng.import(&op.export().unwrap()).unwrap();
    assert!(eng.conflicts().unwrap().is_empty());
}

#[test]
fn importing_twice_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (op, mut eng) = two_copies(tmp.path());
    let bundle = op.export().unwrap();
    let heads_before = eng.doc(&DocId::Fleet).unwrap().heads();
    let again = eng.import(&bundle).unwrap();
    assert!(again.new_changes.is_empty());
    assert_eq!(eng.doc(&DocId::Fleet).unwrap().heads(), heads_before);
}

#[test]
fn a_tampered_bundle_is_refused_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let mut op = DataDir::init(&tmp.path().join("op"), "grid", 1).unwrap();
    apply(&mut op, APP);
    apply(&mut op, &site_override(true, "v1"));
    let good = op.export().unwrap();
    let fresh = |name: &str| {
        let id = tmp.path().join("op").join(IDENTITY_FILE);
        DataDir::use_identity(&tmp.path().join(name), &id).unwrap()
    };
    // Flip one bit in each region of the file; none may be imported.
    let mut refused = 0;
    for pos in (45..good.len()).step_by(97) {
        let mut bad = good.clone();
        bad[pos] ^= 0x10;
        let mut dd = fresh(&format!("victim{pos}"));
        match dd.import(&bad) {
            Err(Error::Bundle(_)) => refused += 1,
            Err(other) => panic!("unexpected error kind at {pos}: {other}"),
            Ok(r) => panic!("tampered bundle at byte {pos} accepted: {r:?}"),
        }
        assert!(
            dd.store().doc_ids().unwrap().is_empty(),
            "something stored at {pos}"
        );
    }
    assert!(refused > 10);
    // The untouched bundle imports.
    let mut dd = fresh("clean");
    dd.import(&good).unwrap();
    assert_eq!(dd.fleet().unwrap().apps.len(), 1);
}

#[test]
fn a_bundle_of_another_fleet_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = DataDir::init(&tmp.path().join("a"), "a", 1).unwrap();
    let mut b = DataDir::init(&tmp.path().join("b"), "b", 1).unwrap();
    let err = b.import(&a.export().unwrap()).unwrap_err().to_string();
    assert!(err.contains("belongs to fleet"), "{err}");
}

#[test]
fn a_site_engineer_cannot_write_the_fleet_or_another_site() {
    let tmp = tempfile::tempdir().unwrap();
    let (_op, mut eng) = two_copies(tmp.path());
    let before = eng.doc(&DocId::Fleet).unwrap().heads();
    // App (fleet) and SiteOverride (own site) in one file: nothing half-applied.
    let text = format!(
        "{}---\n{}",
        APP.replace("version: v1", "version: v9"),
        site_override(true, "v1")
    );
    let err = eng
        .apply(&manifest::parse("t.yaml", &text).unwrap(), 2)
        .unwrap_err();
    assert!(matches!(err, Error::NotAllowed(_)), "{err}");
    assert!(
        err.to_string()
            .contains("eve (site-engineer of site a) may not write fleet"),
        "{err}"
    );
    assert_eq!(eng.doc(&DocId::Fleet).unwrap().heads(), before);
    assert_eq!(
        eng.doc(&DocId::Site("a".into()))
            .unwrap()
            .get("apps.inspect.paused"),
        Some(serde_json::json!(false))
    );
    let other = site_override(true, "v1").replace("name: a", "name: b");
    let err = eng
        .apply(&manifest::parse("t.yaml", &other).unwrap(), 2)
        .unwrap_err();
    assert!(err.to_string().contains("may not write site/b"), "{err}");
}

#[test]
fn apply_writes_only_changed_fields_and_delete_removes_all() {
    let tmp = tempfile::tempdir().unwrap();
    let mut op = DataDir::init(&tmp.path().join("op"), "grid", 1).unwrap();
    assert!(apply(&mut op, APP) > 0);
    assert_eq!(apply(&mut op, APP), 0);
    assert_eq!(
        apply(&mut op, &APP.replace("version: v1", "version: v2")),
        1
    );
    // Removing a field from the manifest deletes it.
    assert_eq!(apply(&mut op, &APP.replace("  version: v1\n", "")), 1);
    assert_eq!(op.fleet().unwrap().apps["inspect"].version, None);
    op.delete(Kind::App, "inspect", 3).unwrap();
    assert!(op.fleet().unwrap().apps.is_empty());
    assert!(op.doc(&DocId::Fleet).unwrap().fields("apps.").is_empty());
    assert!(matches!(
        op.delete(Kind::App, "inspect", 3),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn delete_concurrent_with_an_edit_deletes_the_entity() {
    let tmp = tempfile::tempdir().unwrap();
    let mut op = DataDir::init(&tmp.path().join("op"), "grid", 1).unwrap();
    apply(&mut op, APP);
    let op2_id = op.create_identity(Role::Operator, None, "bob", 1).unwrap();
    op2_id.write(&tmp.path().join("bob.json")).unwrap();
    let mut bob =
        DataDir::use_identity(&tmp.path().join("bob"), &tmp.path().join("bob.json")).unwrap();
    bob.import(&op.export().unwrap()).unwrap();
    op.delete(Kind::App, "inspect", 2).unwrap();
    apply(&mut bob, &APP.replace("version: v1", "version: v2"));
    bob.import(&op.export().unwrap()).unwrap();
    op.import(&bob.export().unwrap()).unwrap();
    for dd in [&op, &bob] {
        assert!(dd.fleet().unwrap().apps.is_empty());
    }
    // Re-creating the app clears the orphan field.
    apply(&mut op, &APP.replace("  version: v1\n", ""));
    assert_eq!(op.fleet().unwrap().apps["inspect"].version, None);
}

#[test]
fn state_survives_reopen_and_compaction_keeps_signatures() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("op");
    let mut op = DataDir::init(&dir, "grid", 1).unwrap();
    for i in 0..600 {
        apply(
            &mut op,
            &APP.replace("version: v1", &format!("version: v{i}")),
        );
    }
    drop(op);
    let op = DataDir::open(&dir, None).unwrap();
    assert_eq!(
        op.fleet().unwrap().apps["inspect"].version.as_deref(),
        Some("v599")
    );
    let bundle = op.export().unwrap();
    let mut other = DataDir::use_identity(&tmp.path().join("b"), &dir.join(IDENTITY_FILE)).unwrap();
    let r = other.import(&bundle).unwrap();
    // fleet init, the first apply, then 599 version changes
    assert_eq!(r.new_changes.get("fleet"), Some(&601));
    assert_eq!(other.fleet().unwrap(), op.fleet().unwrap());
}

#[test]
fn corrupt_and_foreign_store_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // Not a database at all.
    let junk = tmp.path().join("junk.redb");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let err = Store::open(&junk, StoreConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("junk.redb"), "{err}");
    // A redb file that is not ours.
    let foreign = tmp.path().join("foreign.redb");
    {
        let db = redb::Database::create(&foreign).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(redb::TableDefinition::<u64, u64>::new("x"))
            .unwrap()
            .insert(1, 2)
            .unwrap();
        w.commit().unwrap();
    }
    let err = Store::open(&foreign, StoreConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a Shoal store"), "{err}");
    // A data dir whose store is held by another opener.
    let dir = tmp.path().join("op");
    let op = DataDir::init(&dir, "grid", 1).unwrap();
    let err = DataDir::open(&dir, None).unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    drop(op);
    // Bytes flipped all over a real store: an error or a readable store, never a panic.
    let good = std::fs::read(dir.join(STORE_FILE)).unwrap();
    let mut outcomes = (0, 0);
    for pos in (0..good.len()).step_by(good.len() / 64 + 1) {
        let mut bad = good.clone();
        for b in &mut bad[pos..(pos + 64).min(good.len())] {
            *b ^= 0xa5;
        }
        let d = tmp.path().join(format!("flip{pos}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(STORE_FILE), &bad).unwrap();
        let checked = std::panic::catch_unwind(|| Store::check(&d.join(STORE_FILE)));
        assert!(checked.is_ok(), "store check panicked at {pos}");
        let result = std::panic::catch_unwind(|| {
            DataDir::open(&d, None)
                .and_then(|dd| dd.fleet().map(|_| ()).and(dd.export().map(|_| ())))
        });
        match result {
            Err(_) => panic!("panic on a store with bytes flipped at {pos}"),
            Ok(Ok(())) => outcomes.0 += 1,
            Ok(Err(_)) => outcomes.1 += 1,
        }
    }
    assert!(
        outcomes.1 > 0,
        "no corruption detected at all: {outcomes:?}"
    );
}

#[test]
fn a_revoked_writer_keeps_what_was_seen_and_nothing_more() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut op, mut eng) = two_copies(tmp.path());
    apply(&mut eng, &site_override(true, "v1"));
    op.import(&eng.export().unwrap()).unwrap();
    let eve = op.find_key("eve").unwrap();
    let r = op.revoke(eve, "laptop lost", 5).unwrap();
    assert_eq!(r.accepted.len(), 1);
    // Eve, not yet told, edits again; her new change is refused whole.
    apply(&mut eng, &site_override(false, "v1"));
    let err = op.import(&eng.export().unwrap()).unwrap_err().to_string();
    assert!(err.contains("eve is revoked"), "{err}");
    let site = DocId::Site("a".into());
    assert_eq!(
        op.doc(&site).unwrap().get("apps.inspect.paused"),
        Some(serde_json::json!(true))
    );
    // A third copy gets the revocation and Eve's earlier change together.
    let third = tmp.path().join("third");
    let mut third =
        DataDir::use_identity(&third, &tmp.path().join("op").join(IDENTITY_FILE)).unwrap();
    third.import(&op.export().unwrap()).unwrap();
    assert_eq!(
        third.doc(&site).unwrap().get("apps.inspect.paused"),
        Some(serde_json::json!(true))
    );
    assert!(third.trust().is_revoked(&eve));
}

#[test]
fn dropping_a_document_removes_all_of_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut op = DataDir::init(&tmp.path().join("op"), "grid", 1).unwrap();
    apply(&mut op, &site_override(true, "v1"));
    let site = DocId::Site("a".into());
    let store = op.store();
    store.put_sync_state("peer", &site, b"state").unwrap();
    assert!(!store.signatures(&site).unwrap().is_empty());
    store.drop_doc(&site).unwrap();
    assert!(!store.doc_ids().unwrap().contains(&site));
    assert!(store.signatures(&site).unwrap().is_empty());
    assert!(store.load(&site).unwrap().is_none());
    assert!(store.sync_states_of("peer").unwrap().is_empty());
    assert!(store.load(&DocId::Fleet).unwrap().is_some());
}

#[test]
fn a_set_message_is_recorded_in_the_signed_change() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dd = DataDir::init(tmp.path(), "f", 1).unwrap();
    dd.set_message(Some("alice through the anchor API".into()));
    let cfg = "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {name: c}\nspec: {data: {k: v}}\n";
    dd.apply(&crdt_state::fleet::manifest::parse("c", cfg).unwrap(), 2)
        .unwrap();
    dd.set_message(None);
    let cfg2 = cfg.replace("k: v", "k: w");
    dd.apply(&crdt_state::fleet::manifest::parse("c", &cfg2).unwrap(), 3)
        .unwrap();
    let doc = dd.doc(&crdt_state::DocId::Fleet).unwrap();
    let messages: Vec<Option<String>> = doc
        .automerge()
        .get_changes_meta(&[])
        .iter()
        .map(|m| m.message.as_ref().map(|s| s.to_string()))
        .collect();
    let n = messages.len();
    assert_eq!(
        messages[n - 2].as_deref(),
        Some("alice through the anchor API")
    );
    assert_eq!(messages[n - 1], None);
}

#[test]
fn prepared_commits_take_a_given_snapshot_and_keep_every_signature() {
    use crdt_state::local::store::Prepared;
    let tmp = tempfile::tempdir().unwrap();
    let op = DataDir::init(&tmp.path().join("op"), "grid", 1).unwrap();
    let writer = op.identity().unwrap().clone();
    let store = Store::open(&tmp.path().join("w.redb"), StoreConfig::default()).unwrap();
    let mut doc = crdt_state::Document::new(crdt_state::DocId::Fleet);
    let mut all = Vec::new();
    for round in 0..3u32 {
        let mut changes = Vec::new();
        for i in 0..4u32 {
            let ops = std::collections::BTreeMap::from([(
                format!("apps.a{i}.version"),
                Some(format!("\"v{round}\"")),
            )]);
            let (h, c, _) = doc.edit(&writer, 1, &ops).unwrap().unwrap();
            changes.push((h, c));
        }
        all.extend(changes.iter().map(|(h, _)| *h));
        // The second round hands a snapshot: chunks are replaced by it.
        let snapshot = (round == 1).then(|| doc.save());
        store
            .commit_prepared(&[Prepared {
                doc: crdt_state::DocId::Fleet,
                changes,
                snapshot,
            }])
            .unwrap();
        let chunks = store.chunk_counts().unwrap()[&crdt_state::DocId::Fleet];
        assert_eq!(chunks, [4, 0, 4][round as usize], "round {round}");
    }
    let loaded = store.load(&crdt_state::DocId::Fleet).unwrap().unwrap();
    assert_eq!(loaded.heads(), doc.heads());
    let sigs = store.signatures(&crdt_state::DocId::Fleet).unwrap();
    assert!(
        all.iter().all(|h| sigs.contains_key(h)),
        "a signature was lost"
    );
}

#[test]
fn a_peers_sync_states_come_back_in_one_read_and_only_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let op = DataDir::init(&tmp.path().join("op"), "grid", 1).unwrap();
    let store = op.store();
    let site = DocId::Site("a".into());
    store.put_sync_state("peer", &DocId::Fleet, b"f").unwrap();
    store.put_sync_state("peer", &site, b"s").unwrap();
    // Keys that sort right after and before it are another peer's.
    store.put_sync_state("peer2", &DocId::Fleet, b"x").unwrap();
    store.put_sync_state("pee", &DocId::Fleet, b"y").unwrap();
    let mut got = store.sync_states_of("peer").unwrap();
    got.sort();
    let mut want = vec![(DocId::Fleet, b"f".to_vec()), (site, b"s".to_vec())];
    want.sort();
    assert_eq!(got, want);
    assert!(store.sync_states_of("nobody").unwrap().is_empty());
}
