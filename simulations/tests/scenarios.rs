//! Every shipped scenario passes its expectations, and a scenario with a
//! seed replays to the identical report.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use simulations::sim::run_scenario;

fn scenario(name: &str) -> String {
    let path = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn check(name: &str) -> simulations::sim::Report {
    let report = run_scenario(&scenario(name), None, |_| {}).unwrap();
    assert!(
        report.passed(),
        "{name} failed (replay: shoal sim run simulations/scenarios/{name}.toml --seed {}): {:?}",
        report.seed,
        report.invariants
    );
    report
}

#[test]
fn two_sites_partitioned_for_a_week_merge_with_the_conflict_surfaced() {
    let r = check("two-sites-week-partition");
    assert_eq!(r.conflicts, 1);
    assert_eq!(r.heals.len(), 1);
    // Every replica agrees with the latest fleet state at the end.
    assert_eq!(r.agreement.last().map(|a| a.1), Some(r.nodes));
}

#[test]
fn the_plot_shows_the_agreement_curve_and_events() {
    let r = check("chain-of-six");
    let svg = r.plot_svg();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 1);
    assert_eq!(svg.matches("stroke-dasharray").count(), r.events.len());
}

#[test]
fn a_chain_reaches_the_far_end() {
    let r = check("chain-of-six");
    assert!(r.links.contains_key("anchor<->c[0]"), "{:?}", r.links);
    // Six links carried traffic: anchor-c0 and the five chain hops.
    assert_eq!(r.per_link.len(), 6, "{:?}", r.per_link.keys());
    let per_link: u64 = r.per_link.values().map(|t| t.bytes).sum();
    let per_kind: u64 = r.links.values().map(|t| t.bytes).sum();
    assert_eq!(per_link, per_kind);
}

#[test]
fn an_anchor_crash_and_restart_loses_nothing() {
    check("anchor-crash-restart");
}

#[test]
fn a_rogue_node_changes_nothing_and_is_reported() {
    let r = check("rogue-node");
    assert!(r.security_events >= 1, "{r:?}");
    assert!(r.invariants.no_forged_applied);
}

#[test]
fn clock_skew_of_days_changes_nothing() {
    let r = check("clock-skew");
    assert_eq!(r.conflicts, 1);
}

#[test]
fn a_thousand_nodes_converge() {
    let r = check("thousand-nodes");
    assert_eq!(r.nodes, 1000);
}

#[test]
fn the_same_seed_gives_the_same_report() {
    let text = scenario("two-sites-week-partition");
    let a = serde_json::to_string(&run_scenario(&text, None, |_| {}).unwrap()).unwrap();
    let b = serde_json::to_string(&run_scenario(&text, None, |_| {}).unwrap()).unwrap();
    assert_eq!(a, b);
    let c = serde_json::to_string(&run_scenario(&text, Some(8), |_| {}).unwrap()).unwrap();
    assert_ne!(a, c, "another seed should move at least the timings");
}

#[test]
fn bad_scenarios_are_clear_errors() {
    let err = run_scenario(
        "name = 'x'\nduration = '1h'\ngroup = [{ name = 'a', count = 2 }]\n",
        None,
        |_| {},
    )
    .unwrap_err();
    assert!(err.contains("nodes need a site"), "{err}");
    let err = run_scenario("name = 'x'\nduration = '1x'\ngroup = []\n", None, |_| {}).unwrap_err();
    assert!(err.contains("unknown unit"), "{err}");
}

#[test]
fn invariants_hold_under_other_seeds() {
    for name in [
        "two-sites-week-partition",
        "chain-of-six",
        "anchor-crash-restart",
        "rogue-node",
    ] {
        for seed in 100..104 {
            let r = run_scenario(&scenario(name), Some(seed), |_| {}).unwrap();
            assert!(
                r.passed(),
                "{name} failed (replay: shoal sim run simulations/scenarios/{name}.toml --seed {seed}): {:?}",
                r.invariants
            );
        }
    }
}

/// A partition may name single nodes: the node cut off edits on its own,
/// so its edit and the operator's are concurrent (one conflict). Were the
/// partition to cut nothing, the later edit would see the earlier one and
/// nothing would conflict.
const NODE_PARTITION: &str = r#"
name = "one-node-cut-off"
seed = 5
duration = "1d"
group = [
  { name = "anchor", count = 1, role = "anchor" },
  { name = "a", count = 3, site = "a" },
]
link = [
  { between = ["anchor", "a"], latency = "60ms" },
  { within = "a", latency = "2ms" },
]
event = [
  { at = "1h", partition = [["anchor", "a[0]", "a[1]"], ["a[2]"]] },
  { at = "2h", edit = { by = "site-engineer:a", on = "a[2]", doc = "site/a", set = { "configs.c.data.k" = "field" } } },
  { at = "3h", edit = { by = "operator", on = "anchor", doc = "site/a", set = { "configs.c.data.k" = "office" } } },
  { at = "20h", heal = true },
]
expect = { converged_within = "5s", conflicts = 1 }
"#;

#[test]
fn a_partition_naming_nodes_cuts_them_off() {
    let r = run_scenario(NODE_PARTITION, None, |_| {}).unwrap();
    assert!(r.passed(), "{:?}", r.invariants);
    assert_eq!(r.conflicts, 1, "the partition cut nothing: {:?}", r.events);
}

#[test]
fn a_partition_naming_nothing_known_stops_the_run() {
    let bad = NODE_PARTITION.replace(r#"["a[2]"]"#, r#"["b"]"#);
    let e = run_scenario(&bad, None, |_| {}).unwrap_err();
    assert!(
        e.contains(r#"names "b", which is no group and no node"#),
        "{e}"
    );
    let bad = NODE_PARTITION.replace(r#"["a[2]"]"#, r#"["a[7]"]"#);
    let e = run_scenario(&bad, None, |_| {}).unwrap_err();
    assert!(e.contains("a[7]"), "{e}");
    let bad = NODE_PARTITION.replace(r#"["a[2]"]"#, r#"["a[1]"]"#);
    let e = run_scenario(&bad, None, |_| {}).unwrap_err();
    assert!(e.contains("on two sides"), "{e}");
}

#[test]
fn skew_takes_a_duration() {
    let text = scenario("clock-skew");
    assert!(text.contains(r#"by = "-3d""#));
    let r = check("clock-skew");
    assert!(
        r.events
            .iter()
            .any(|e| e.contains("skew a-1 by -259200s") || e.contains("by -259200s")),
        "{:?}",
        r.events
    );
    let bad = text.replace(r#"by = "-3d""#, r#"by = "-3 days""#);
    assert!(
        run_scenario(&bad, None, |_| {})
            .unwrap_err()
            .contains("skew of a[1]")
    );
}

#[test]
fn a_crash_before_the_commit_loses_only_what_was_never_acknowledged() {
    let r = check("crash-mid-commit");
    // The edit cut short by the crash is gone, and nobody else has it.
    assert_eq!(r.uncommitted_lost, 1, "{:?}", r.events);
    assert!(r.invariants.nothing_sent_before_commit);
    assert!(r.invariants.nothing_lost && r.invariants.converged);
    // With the commit made at once, the same crash loses nothing.
    let text = scenario("crash-mid-commit").replace("commit_latency = \"20ms\"", "");
    let r = run_scenario(&text, None, |_| {}).unwrap();
    assert!(r.passed(), "{:?}", r.invariants);
    assert_eq!(r.uncommitted_lost, 0);
}

/// Staged rollouts (ADR 0011) on the simulator's pretend runtime, each over
/// 200 nodes in five sites: a good version through three waves; a bad
/// version rolled back on the canary and halted before wave 1; a site cut
/// off during wave 2 that finishes after the heal; two anchors judging at
/// once; skewed clocks.
#[test]
fn rollouts_go_by_waves_and_halt_on_a_bad_canary() {
    let good = check("rollout-three-waves");
    let r = &good.rollouts["meter"];
    assert_eq!(r.wave_sizes, [40, 16, 144]);
    assert_eq!(r.decisions.len(), 3, "{:?}", r.decisions);
    let bad = check("rollout-bad-canary");
    let r = &bad.rollouts["meter"];
    assert_eq!((r.ran_bad, r.rolled_back), (40, 40));
    assert!(r.decisions[0].contains("halt"), "{:?}", r.decisions);
}

#[test]
fn a_rollout_survives_a_partition_two_anchors_and_skewed_clocks() {
    let cut = check("rollout-site-partitioned-in-wave-2");
    // The last gate could only hold once the west site was back.
    let done = &cut.rollouts["meter"].decisions[2];
    let at: f64 = done.split('s').next().unwrap().parse().unwrap();
    assert!(at > 600.0, "{done}");
    check("rollout-two-anchors");
    check("rollout-clock-skew");
}
