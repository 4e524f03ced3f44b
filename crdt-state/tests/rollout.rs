//! Staged rollouts over real signed documents (ADR 0011): an apply starts
//! one, waves are a pure function every replica agrees on, nodes choose
//! their spec from the documents, and concurrent decisions of two anchors
//! merge to one outcome.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, HashMap};

use crdt_state::fleet::manifest;
use crdt_state::fleet::model::{
    FleetView, NodeReport, RollbackReport, WorkloadReport, WorkloadState,
};
use crdt_state::fleet::placement;
use crdt_state::fleet::rollout::{self, Decision, Mark};
use crdt_state::local::datadir::plan_apply;
use crdt_state::signed::verify::verify_and_apply;
use crdt_state::{DocId, Document, Identity};

const NODES: usize = 100;

fn app(version: &str, waves: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: web}}\nspec:\n  version: {version}\n  native: {{command: [/bin/web, {version}]}}\n  rollout:\n    waves: {waves}\n    healthy_for_s: 30\n    max_failures: \"10%\"\n"
    )
}

const WAVES: &str = "[{sites: [canary]}, {percent: 10}, {percent: 100}]";

/// A fleet document with 100 nodes (5 in site `canary`) and `web` at v1.
fn fleet(op: &Identity) -> Document {
    let mut doc = Document::new(DocId::Fleet);
    let mut text = String::new();
    for i in 0..NODES {
        let site = if i < 5 { "canary" } else { "plant" };
        text += &format!(
            "---\napiVersion: shoal.dev/v1\nkind: Node\nmetadata: {{name: n{i:03}}}\nspec: {{site: {site}}}\n"
        );
    }
    text += "---\n";
    text += &app("v1", WAVES);
    apply(&mut doc, op, &text);
    doc
}

fn apply(doc: &mut Document, who: &Identity, text: &str) -> usize {
    let ms = manifest::parse("test.yaml", text).unwrap();
    let (_, edits) = plan_apply(&ms, &|_| Some(&*doc));
    let mut n = 0;
    for (_, ops) in edits {
        n += ops.len();
        doc.edit(who, 0, &ops).unwrap();
    }
    n
}

fn decide(doc: &mut Document, who: &Identity, d: Decision, at: i64) -> crdt_state::SignedChange {
    let view = FleetView::read(doc);
    let rev = view.rollouts["web"].revision.clone();
    let mark = Mark {
        at,
        by: who.cert.name.clone(),
        reason: format!("{d:?}"),
    };
    let ops = rollout::decision_ops(doc, "web", &rev, &d, &mark);
    doc.edit(who, at, &ops).unwrap().unwrap().1
}

/// Every node's wave in `web`'s rollout.
fn waves_of(view: &FleetView) -> HashMap<String, usize> {
    let app = &view.apps["web"];
    rollout::waves(
        view,
        "web",
        app,
        app.rollout.as_ref().unwrap(),
        &view.rollouts["web"].revision,
    )
}

/// The version `web`'s rollout replaces.
fn from_version(view: &FleetView) -> Option<String> {
    view.rollouts["web"].from.as_ref()?.version.clone()
}

fn spec_of(view: &FleetView, node: &str) -> Option<String> {
    placement::share(view, None, node, &|_| true)
        .into_iter()
        .find(|w| w.app == "web")
        .and_then(|w| w.spec.version)
}

#[test]
fn an_apply_starts_a_rollout_and_nodes_run_by_their_wave() {
    let f = common::fleet();
    let mut doc = fleet(&f.op1);
    let view = FleetView::read(&doc);
    // A new app goes everywhere at once: nothing to roll from.
    assert!(view.rollouts.is_empty());
    assert_eq!(spec_of(&view, "n050").as_deref(), Some("v1"));

    apply(&mut doc, &f.op1, &app("v2", WAVES));
    let view = FleetView::read(&doc);
    let state = &view.rollouts["web"];
    // The revision nodes compute from the document is the apply's.
    assert_eq!(state.revision, rollout::revision(&view.apps["web"]));
    assert_eq!(from_version(&view).as_deref(), Some("v1"));
    let waves = waves_of(&view);
    // Every node in exactly one wave: the canary site, a tenth of the
    // other 95 (rounded up), the rest.
    assert_eq!(waves.len(), NODES);
    let count = |w: usize| waves.values().filter(|&&x| x == w).count();
    assert_eq!((count(0), count(1), count(2)), (5, 10, 85));
    for i in 0..5 {
        assert_eq!(waves[&format!("n{i:03}")], 0);
    }
    // Wave 0 is open from the start; the others wait.
    let in_wave = |w: usize| {
        waves
            .iter()
            .filter(|(_, x)| **x == w)
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>()
    };
    for n in in_wave(0) {
        assert_eq!(spec_of(&view, &n).as_deref(), Some("v2"), "{n}");
    }
    for n in in_wave(1).into_iter().chain(in_wave(2)) {
        assert_eq!(spec_of(&view, &n).as_deref(), Some("v1"), "{n}");
    }
    // Re-applying the same file starts nothing new.
    assert_eq!(apply(&mut doc, &f.op1, &app("v2", WAVES)), 0);

    // Wave 1 opens: its nodes move, wave 2's stay.
    decide(&mut doc, &f.op1, Decision::Open(1), 10);
    let view = FleetView::read(&doc);
    for n in in_wave(1) {
        assert_eq!(spec_of(&view, &n).as_deref(), Some("v2"), "{n}");
    }
    for n in in_wave(2) {
        assert_eq!(spec_of(&view, &n).as_deref(), Some("v1"), "{n}");
    }
    // A node that rolled v2 back runs v1 though its wave is open.
    let n = in_wave(1)[0].clone();
    let back = BTreeMap::from([("web".to_string(), view.rollouts["web"].revision.clone())]);
    let w = placement::share_with(&view, None, &n, &|_| true, &back, &mut |a| {
        rollout::wave_of(&view, a, &n)
    });
    assert_eq!(w[0].spec.version.as_deref(), Some("v1"));
    assert_eq!(
        w[0].revision,
        view.rollouts["web"].from_revision.clone().unwrap()
    );
    // Aborted: everyone goes back.
    decide(&mut doc, &f.op1, Decision::Abort, 20);
    let view = FleetView::read(&doc);
    for n in in_wave(0).into_iter().chain(in_wave(1)) {
        assert_eq!(spec_of(&view, &n).as_deref(), Some("v1"), "{n}");
    }
    // Applying v1 again ends it: no rollout from v1 to v1.
    let mut back = Document::load(DocId::Fleet, &doc.save()).unwrap();
    apply(&mut back, &f.op1, &app("v1", WAVES));
    let view = FleetView::read(&back);
    assert!(view.rollouts.is_empty(), "{:?}", view.rollouts);
    assert_eq!(spec_of(&view, "n050").as_deref(), Some("v1"));
    // A new revision starts a new rollout, from the last version every
    // node was given (v1: v2's rollout was aborted, it is no fallback).
    apply(&mut doc, &f.op1, &app("v3", WAVES));
    let view = FleetView::read(&doc);
    assert!(view.rollouts["web"].aborted.is_none());
    assert!(view.rollouts["web"].opened.is_empty());
    assert_eq!(from_version(&view).as_deref(), Some("v1"));
    // Once a rollout is done, the next starts from its version.
    decide(&mut doc, &f.op1, Decision::Done, 30);
    apply(&mut doc, &f.op1, &app("v4", WAVES));
    let view = FleetView::read(&doc);
    assert_eq!(from_version(&view).as_deref(), Some("v3"));
}

#[test]
fn a_new_revision_draws_a_new_canary_share_and_waves_agree_everywhere() {
    let f = common::fleet();
    let mut doc = fleet(&f.op1);
    apply(&mut doc, &f.op1, &app("v2", WAVES));
    let a = FleetView::read(&doc);
    let wa = waves_of(&a);
    // Another replica (a copy loaded from bytes) computes the same waves.
    let copy = Document::load(DocId::Fleet, &doc.save()).unwrap();
    let b = FleetView::read(&copy);
    for n in a.nodes.keys() {
        assert_eq!(rollout::wave_of(&b, "web", n), wa.get(n).copied(), "{n}");
    }
    apply(&mut doc, &f.op1, &app("v3", WAVES));
    let c = FleetView::read(&doc);
    let wc = waves_of(&c);
    let first = |w: &HashMap<String, usize>| {
        let mut v: Vec<&String> = w.iter().filter(|(_, x)| **x == 1).map(|(n, _)| n).collect();
        v.sort();
        v.into_iter().cloned().collect::<Vec<_>>()
    };
    assert_ne!(first(&wa), first(&wc), "the same 10% for every revision");
}

#[test]
fn concurrent_decisions_of_two_anchors_merge_to_one_outcome() {
    let f = common::fleet();
    let mut a = fleet(&f.op1);
    apply(&mut a, &f.op1, &app("v2", WAVES));
    let mut b = Document::load(DocId::Fleet, &a.save()).unwrap();
    // Both see the gate hold and open wave 1; then A opens wave 2 while B,
    // not having heard of it, halts.
    let a1 = decide(&mut a, &f.op1, Decision::Open(1), 100);
    let b1 = decide(&mut b, &f.op2, Decision::Open(1), 101);
    let a2 = decide(&mut a, &f.op1, Decision::Open(2), 200);
    let b2 = decide(&mut b, &f.op2, Decision::Halt, 201);
    verify_and_apply(&f.trust, &mut a, &[b1.clone(), b2.clone()]).unwrap();
    verify_and_apply(&f.trust, &mut b, &[a1, a2]).unwrap();
    let (va, vb) = (FleetView::read(&a), FleetView::read(&b));
    assert_eq!(va.rollouts, vb.rollouts);
    let s = &va.rollouts["web"];
    assert!(s.is_open(1) && s.is_open(2));
    assert!(s.halted.is_some());
    // Each decider writes under its own key: nothing to resolve.
    assert!(a.conflicts().is_empty(), "{:?}", a.conflicts());
    // Wave 1 counts as opened by the earlier of the two.
    assert_eq!(s.opened[&1].by, "op1");
    // A decision about the old revision, arriving after a new rollout
    // began, changes nothing of the new one.
    let mut c = Document::load(DocId::Fleet, &a.save()).unwrap();
    apply(&mut a, &f.op1, &app("v3", WAVES));
    let stale = decide(&mut c, &f.op2, Decision::Abort, 300);
    verify_and_apply(&f.trust, &mut a, &[stale]).unwrap();
    let s = &FleetView::read(&a).rollouts["web"];
    assert!(s.aborted.is_none() && s.halted.is_none() && s.opened.is_empty());
}

fn report(revision: &str, state: WorkloadState, restarts: u32) -> NodeReport {
    NodeReport {
        workloads: BTreeMap::from([(
            "web".to_string(),
            WorkloadReport {
                state,
                restarts,
                revision: Some(revision.into()),
                ..WorkloadReport::default()
            },
        )]),
        ..NodeReport::default()
    }
}

#[test]
fn the_gate_opens_on_health_held_long_enough_and_halts_past_the_budget() {
    let f = common::fleet();
    let mut doc = fleet(&f.op1);
    apply(&mut doc, &f.op1, &app("v2", WAVES));
    let view = FleetView::read(&doc);
    let rev = view.rollouts["web"].revision.clone();
    let canary: Vec<String> = (0..5).map(|i| format!("n{i:03}")).collect();
    let mut reports: BTreeMap<String, NodeReport> = canary
        .iter()
        .map(|n| (n.clone(), report(&rev, WorkloadState::Running, 0)))
        .collect();
    let mut seen = rollout::Seen::new();
    // Healthy, but not for 30 s yet: no decision.
    let (status, d) = rollout::judge(&view, "web", &reports, &mut seen, 1_000_000).unwrap();
    assert_eq!(d, None);
    assert_eq!(status.waves[0].updated, 5);
    assert_eq!(status.waves[0].healthy, 0);
    assert!(
        status.waiting_for.contains("in 30 s"),
        "{}",
        status.waiting_for
    );
    // 30 s later by the anchor's clock: wave 1 opens.
    let (status, d) = rollout::judge(&view, "web", &reports, &mut seen, 1_030_000).unwrap();
    assert_eq!(status.waves[0].healthy, 5);
    assert!(matches!(d, Some((Decision::Open(1), _))), "{d:?}");
    // One canary missing its report: 10% of 5 is 0 allowed, so the gate waits.
    let gone = reports.remove(&canary[4]).unwrap();
    let (status, d) = rollout::judge(&view, "web", &reports, &mut seen, 1_031_000).unwrap();
    assert_eq!((status.waves[0].unreachable, d), (1, None));
    reports.insert(canary[4].clone(), gone);
    // One canary rolled back: more than the budget, halted, naming it.
    reports.get_mut(&canary[2]).unwrap().rollbacks.insert(
        "web".into(),
        RollbackReport {
            revision: rev.clone(),
            reason: "exited with code 3".into(),
            at: 0,
        },
    );
    let (status, d) = rollout::judge(&view, "web", &reports, &mut seen, 1_040_000).unwrap();
    assert_eq!(status.waves[0].failed, 1);
    let (d, why) = d.unwrap();
    assert_eq!(d, Decision::Halt);
    assert!(
        why.contains("n002: rolled back: exited with code 3"),
        "{why}"
    );
    // A crash-looping node counts as failed too (third crash).
    reports.get_mut(&canary[2]).unwrap().rollbacks.clear();
    *reports.get_mut(&canary[3]).unwrap() = report(&rev, WorkloadState::Failed, 2);
    let (_, d) = rollout::judge(&view, "web", &reports, &mut seen, 1_041_000).unwrap();
    assert_eq!(d.map(|d| d.0), Some(Decision::Halt));
    // With `on_failure: rollback` the same gate aborts: everyone goes back.
    let text = app("v2", WAVES).replace(
        "healthy_for_s: 30",
        "healthy_for_s: 30\n    on_failure: rollback",
    );
    let mut again = Document::load(DocId::Fleet, &doc.save()).unwrap();
    apply(&mut again, &f.op1, &text);
    let view = FleetView::read(&again);
    assert_eq!(
        view.rollouts["web"].revision, rev,
        "a policy change starts nothing"
    );
    let (_, d) = rollout::judge(&view, "web", &reports, &mut seen, 1_042_000).unwrap();
    assert_eq!(d.map(|d| d.0), Some(Decision::Abort));
}

#[test]
fn policies_are_checked_by_field() {
    let bad = [
        ("[]", "needs at least one wave"),
        ("[{percent: 10}]", "the last wave must be percent: 100"),
        (
            "[{percent: 50}, {percent: 40}]",
            "is not above the wave before",
        ),
        (
            "[{percent: 50}, {sites: [a]}]",
            "come before percentage waves",
        ),
        (
            "[{sites: [a], percent: 100}]",
            "exactly one of sites, labels or percent",
        ),
        ("[{percent: 0}, {percent: 100}]", "not between 1 and 100"),
    ];
    for (waves, msg) in bad {
        let err = manifest::parse("x.yaml", &app("v1", waves)).unwrap_err();
        assert!(err.to_string().contains(msg), "{waves}: {err}");
        assert!(err.to_string().contains("rollout.waves"), "{waves}: {err}");
    }
    let text = app("v1", WAVES).replace("\"10%\"", "\"ten\"");
    let err = manifest::parse("x.yaml", &text).unwrap_err();
    assert!(err.to_string().contains("rollout.max_failures"), "{err}");
    // A number is a count.
    let ms = manifest::parse("x.yaml", &app("v1", WAVES).replace("\"10%\"", "2")).unwrap();
    let manifest::Spec::App(a) = &ms[0].spec else {
        panic!("not an app")
    };
    assert_eq!(a.rollout.as_ref().unwrap().max_failures, "2");
}

#[test]
fn a_failure_is_what_the_runtime_cannot_get_over() {
    let spec = crdt_state::fleet::model::AppSpec::default();
    let r = |state, restarts, reason: &str| WorkloadReport {
        state,
        restarts,
        reason: Some(reason.into()),
        ..WorkloadReport::default()
    };
    assert!(rollout::failure(&spec, &r(WorkloadState::Failed, 0, "exited with code 1")).is_none());
    assert!(rollout::failure(&spec, &r(WorkloadState::Failed, 2, "exited with code 1")).is_some());
    assert!(rollout::failure(&spec, &r(WorkloadState::Running, 5, "")).is_none());
    let unhealthy = r(
        WorkloadState::Failed,
        0,
        "health check failed 3 times: refused",
    );
    assert!(rollout::failure(&spec, &unhealthy).is_some());
}

/// A new model is a new revision of the App that reads it: the artifact's
/// name in `spec.artifacts` changes, and nodes move to it by their wave.
#[test]
fn a_new_artifact_version_rolls_out_wave_by_wave() {
    let f = common::fleet();
    let mut doc = fleet(&f.op1);
    let with_model = |model: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: Artifact\nmetadata: {{name: {model}}}\nspec: {{size: 3, hash: {}}}\n---\n{}  artifacts: {{model: {model}}}\n",
            "ab".repeat(32),
            app("v1", WAVES)
        )
    };
    apply(&mut doc, &f.op1, &with_model("model-a"));
    // model-a reached every node.
    decide(&mut doc, &f.op1, Decision::Done, 5);
    apply(&mut doc, &f.op1, &with_model("model-b"));
    let view = FleetView::read(&doc);
    let state = &view.rollouts["web"];
    assert_eq!(
        state.from.as_ref().unwrap().artifacts["model"],
        "model-a",
        "the rollout replaces the App reading model-a"
    );
    let model_of = |view: &FleetView, n: &str| {
        placement::share(view, None, n, &|_| true)
            .into_iter()
            .find(|w| w.app == "web")
            .map(|w| w.spec.artifacts["model"].clone())
    };
    assert_eq!(model_of(&view, "n000").as_deref(), Some("model-b"));
    let later = (5..NODES)
        .map(|i| format!("n{i:03}"))
        .find(|n| rollout::wave_of(&view, "web", n) == Some(2))
        .unwrap();
    assert_eq!(model_of(&view, &later).as_deref(), Some("model-a"));
    decide(&mut doc, &f.op1, Decision::Open(1), 10);
    decide(&mut doc, &f.op1, Decision::Open(2), 20);
    let view = FleetView::read(&doc);
    assert_eq!(model_of(&view, &later).as_deref(), Some("model-b"));
}
