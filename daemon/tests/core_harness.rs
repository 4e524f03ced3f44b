//! Many daemon cores wired in memory: the decisions of the shipped daemon
//! (admission, commit before send, failed commits, reconcile and report
//! timing, saved states and peers, the timeline) with no socket and no clock.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashSet, VecDeque};

use crdt_state::signed::identity::generate_key;
use crdt_state::signed::sync::{Engine, SyncConfig};
use crdt_state::{DocId, Identity, PublicKey, Role, Trust};
use daemon::{Action, Arrival, Core, Now, Settings};

struct Net {
    cores: Vec<Core<usize>>,
    ids: Vec<Identity>,
    /// Frames in flight: (from, to, frame).
    wire: VecDeque<(usize, usize, Vec<u8>)>,
    /// What each core's store committed (change hashes).
    stored: Vec<HashSet<automerge::ChangeHash>>,
    /// Commits each core should fail from now on.
    failing: Vec<bool>,
    /// Every action each core asked for, in words, oldest first.
    log: Vec<Vec<String>>,
    saved_states: Vec<usize>,
    saved_peers: Vec<Option<Vec<String>>>,
    /// What each core's devices say (reported on Reconcile and Report).
    devices: Vec<BTreeMap<String, crdt_state::fleet::device::DeviceReport>>,
    now: Now,
    operator: Identity,
}

fn ident(root: &ed25519_dalek::SigningKey, name: &str, role: Role, site: Option<&str>) -> Identity {
    Identity::issue(root, generate_key().unwrap(), name, role, site, 0).unwrap()
}

impl Net {
    /// An anchor (index 0) and `nodes` nodes of site `a`.
    fn new(nodes: usize, settings: impl Fn(usize) -> Settings) -> Net {
        let root = generate_key().unwrap();
        let mut trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
        let operator = ident(&root, "op", Role::Operator, None);
        trust.add_cert(operator.cert.clone()).unwrap();
        let mut ids = vec![ident(&root, "anchor", Role::Anchor, None)];
        for i in 0..nodes {
            ids.push(ident(&root, &format!("n{i}"), Role::Node, Some("a")));
        }
        for id in &ids {
            trust.add_cert(id.cert.clone()).unwrap();
        }
        let cores: Vec<Core<usize>> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let engine = Engine::new(
                    id.cert.clone(),
                    trust.clone(),
                    Vec::new(),
                    SyncConfig::default(),
                );
                Core::new(engine, id.clone(), settings(i))
            })
            .collect();
        let n = cores.len();
        Net {
            cores,
            ids,
            wire: VecDeque::new(),
            stored: vec![HashSet::new(); n],
            failing: vec![false; n],
            log: vec![Vec::new(); n],
            saved_states: vec![0; n],
            saved_peers: vec![None; n],
            devices: vec![BTreeMap::new(); n],
            now: Now {
                mono_ms: 0,
                unix_s: 1_700_000_000,
            },
            operator,
        }
    }

    fn hello_of(&self, i: usize) -> Vec<u8> {
        daemon::hello::encode(self.cores[i].trust().root(), &self.ids[i].cert)
    }

    /// `a` and `b` connect; each proves its own key.
    fn connect(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            let hello = self.hello_of(y);
            let key = self.ids[y].key();
            let now = self.now;
            let from = format!("n{y}");
            let arrival = Arrival {
                conn: y,
                bytes: &hello,
                proves: &|k| *k == key,
                from: &from,
                dialable: Some(format!("/ip4/10.0.0.{y}/udp/7411/quic-v1/p2p/peer{y}")),
            };
            self.cores[x].hello(now, arrival, &mut |_| Vec::new());
            self.act(x);
        }
    }

    /// Carries out core `i`'s actions.
    fn act(&mut self, i: usize) {
        while let Some(a) = self.cores[i].poll_action() {
            let line = match &a {
                Action::Commit {
                    batch, snapshots, ..
                } => {
                    let snaps: Vec<String> = snapshots.keys().map(|d| d.to_string()).collect();
                    if snaps.is_empty() {
                        format!("commit {batch}")
                    } else {
                        format!("commit {batch} snapshot {}", snaps.join(","))
                    }
                }
                Action::Send { conn, .. } => format!("send {conn}"),
                other => format!("{other:?}").chars().take(60).collect(),
            };
            self.log[i].push(line);
            match a {
                Action::Send { conn, frame } => self.wire.push_back((i, conn, frame)),
                Action::Commit { batch, changes, .. } => {
                    let now = self.now;
                    if self.failing[i] {
                        self.cores[i].committed(now, batch, Err("disk full".into()));
                    } else {
                        for (_, c) in &changes {
                            self.stored[i].extend(c.iter().map(|(h, _)| *h));
                        }
                        self.cores[i].committed(now, batch, Ok(()));
                    }
                }
                Action::SaveSyncStates(s) => self.saved_states[i] += s.len(),
                Action::SavePeers(p) => self.saved_peers[i] = Some(p),
                Action::Reconcile | Action::Report => {
                    let now = self.now;
                    let devices = self.devices[i].clone();
                    self.cores[i].report(now, BTreeMap::new(), devices, BTreeMap::new());
                }
                _ => {}
            }
        }
    }

    /// Delivers frames until the wire is empty.
    fn settle(&mut self) {
        let mut n = 0;
        while let Some((from, to, frame)) = self.wire.pop_front() {
            n += 1;
            assert!(n < 100_000, "no quiescence");
            let now = self.now;
            self.cores[to].frame(now, from, frame);
            self.act(to);
        }
    }

    fn tick(&mut self, ms: u64) {
        self.now.mono_ms += ms;
        self.now.unix_s += (ms / 1000) as i64;
        for i in 0..self.cores.len() {
            let now = self.now;
            self.cores[i].tick(now);
            self.act(i);
        }
    }

    fn edit(&mut self, on: usize, key: &str, value: &str) -> automerge::ChangeHash {
        let ops = BTreeMap::from([(key.to_string(), Some(format!("\"{value}\"")))]);
        let op = self.operator.clone();
        let now = self.now;
        self.cores[on]
            .write(now, &DocId::Fleet, &op, &ops)
            .unwrap()
            .unwrap()
    }

    fn fleet_has(&self, i: usize, h: &automerge::ChangeHash) -> bool {
        self.cores[i]
            .doc(&DocId::Fleet)
            .is_some_and(|d| d.has_change(h))
    }
}

fn anchor_and_nodes(i: usize) -> Settings {
    Settings {
        workloads: i > 0,
        timeline: i == 0,
        ..Settings::default()
    }
}

#[test]
fn a_change_is_committed_before_any_frame_that_follows_it_leaves() {
    let mut net = Net::new(2, anchor_and_nodes);
    net.connect(0, 1);
    net.connect(0, 2);
    net.settle();
    net.log[0].clear();
    let h = net.edit(0, "apps.web.image", "nginx:1");
    // Nothing left yet: the first thing asked is the commit.
    let first = net.cores[0].poll_action().unwrap();
    let Action::Commit { batch, changes, .. } = first else {
        panic!("expected a commit first, got {first:?}");
    };
    assert!(changes.iter().any(|(_, c)| c.iter().any(|(x, _)| *x == h)));
    // While the commit is out, the frames wait.
    assert!(net.cores[0].poll_action().is_none());
    assert!(
        net.cores[0].held() > 0,
        "the frames for the change are held"
    );
    let now = net.now;
    net.cores[0].committed(now, batch, Ok(()));
    net.stored[0].insert(h);
    net.act(0);
    assert!(net.log[0].iter().any(|l| l == "send 1"), "{:?}", net.log[0]);
    assert!(net.log[0].iter().any(|l| l == "send 2"), "{:?}", net.log[0]);
    net.settle();
    assert!(net.fleet_has(1, &h) && net.fleet_has(2, &h));
    // Every node committed it before it acknowledged anything further.
    assert!(net.stored[1].contains(&h) && net.stored[2].contains(&h));
}

#[test]
fn a_failed_commit_holds_every_frame_and_loses_nothing_once_the_disk_recovers() {
    let mut net = Net::new(1, anchor_and_nodes);
    net.connect(0, 1);
    net.settle();
    net.failing[0] = true;
    let h1 = net.edit(0, "apps.a.image", "a:1");
    net.act(0);
    let h2 = net.edit(0, "apps.b.image", "b:1");
    net.act(0);
    net.settle();
    assert_eq!(
        net.cores[0].commit_failures(),
        1,
        "one failure, then wait for a tick"
    );
    assert!(
        !net.fleet_has(1, &h1) && !net.fleet_has(1, &h2),
        "nothing sent on what was not kept"
    );
    assert!(net.cores[0].held() > 0);
    // Still failing at the next tick: tried again, still held.
    net.tick(1000);
    net.settle();
    assert_eq!(net.cores[0].commit_failures(), 2);
    assert!(!net.fleet_has(1, &h1));
    // The disk recovers: both changes are stored and reach the peer.
    net.failing[0] = false;
    net.tick(1000);
    net.settle();
    assert!(net.stored[0].contains(&h1) && net.stored[0].contains(&h2));
    assert!(net.fleet_has(1, &h1) && net.fleet_has(1, &h2));
    assert_eq!(net.cores[0].held(), 0);
}

#[test]
fn admission_names_the_defect_and_a_revoked_peer_is_cut_off() {
    let mut net = Net::new(2, anchor_and_nodes);
    // n1's hello on a connection that proved another key.
    let hello = net.hello_of(1);
    let now = net.now;
    let arrival = Arrival {
        conn: 1,
        bytes: &hello,
        proves: &|_| false,
        from: "10.0.0.1",
        dialable: None,
    };
    net.cores[0].hello(now, arrival, &mut |_| Vec::new());
    let acts: Vec<String> = std::iter::from_fn(|| net.cores[0].poll_action())
        .map(|a| format!("{a:?}"))
        .collect();
    assert!(
        acts[0].contains("Security") && acts[0].contains("another key"),
        "{acts:?}"
    );
    assert!(acts[1].starts_with("Reject"), "{acts:?}");
    assert_eq!(acts.len(), 2, "nothing admitted: {acts:?}");
    // Garbage is refused too.
    let arrival = Arrival {
        conn: 1,
        bytes: b"\xff",
        proves: &|_| true,
        from: "10.0.0.1",
        dialable: None,
    };
    net.cores[0].hello(now, arrival, &mut |_| Vec::new());
    assert!(matches!(
        net.cores[0].poll_action(),
        Some(Action::Security { .. })
    ));
    assert!(matches!(
        net.cores[0].poll_action(),
        Some(Action::Reject { conn: 1, .. })
    ));
    // Admitted properly, then revoked by an operator's fleet edit.
    net.connect(0, 1);
    net.connect(0, 2);
    net.settle();
    let key = net.ids[2].key();
    let ops = BTreeMap::from([(
        format!("revoked.{key}"),
        Some(r#"{"reason":"stolen","accepted":{}}"#.to_string()),
    )]);
    let op = net.operator.clone();
    let now = net.now;
    net.cores[0].write(now, &DocId::Fleet, &op, &ops).unwrap();
    net.log[0].clear();
    net.act(0);
    assert!(
        net.log[0].iter().any(|l| l.starts_with("Reject { conn: 2")),
        "{:?}",
        net.log[0]
    );
    assert!(!net.log[0].iter().any(|l| l.starts_with("Reject { conn: 1")));
    // The mesh closes a refused connection only after a grace period; what
    // is written meanwhile goes to n1, never to the revoked n2.
    net.log[0].clear();
    let ops = BTreeMap::from([("configs.c".to_string(), Some(r#""Config""#.to_string()))]);
    net.cores[0].write(now, &DocId::Fleet, &op, &ops).unwrap();
    net.act(0);
    assert!(net.log[0].iter().any(|l| l == "send 1"), "{:?}", net.log[0]);
    assert!(
        !net.log[0].iter().any(|l| l == "send 2"),
        "{:?}",
        net.log[0]
    );
}

#[test]
fn a_node_reconciles_on_a_new_desired_state_and_every_thirty_seconds() {
    let mut net = Net::new(1, anchor_and_nodes);
    let now = net.now;
    net.cores[1].start(now);
    net.act(1);
    assert_eq!(
        net.log[1].first().map(String::as_str),
        Some("Reconcile"),
        "before any network"
    );
    net.connect(0, 1);
    net.settle();
    net.log[1].clear();
    // A tick soon after: a report check, no reconcile.
    net.tick(1000);
    assert!(
        net.log[1].contains(&"Report".to_string()),
        "{:?}",
        net.log[1]
    );
    assert!(
        !net.log[1].contains(&"Reconcile".to_string()),
        "{:?}",
        net.log[1]
    );
    // A fleet change arrives: reconcile at once, after its commit.
    net.log[1].clear();
    net.edit(0, "apps.web.image", "nginx:2");
    net.act(0);
    net.settle();
    let r = net.log[1].iter().position(|l| l == "Reconcile");
    let c = net.log[1].iter().position(|l| l.starts_with("commit"));
    assert!(
        matches!((c, r), (Some(c), Some(r)) if c < r),
        "{:?}",
        net.log[1]
    );
    // Thirty seconds with no change: reconcile again (drift).
    net.log[1].clear();
    net.tick(29_000);
    assert!(!net.log[1].contains(&"Reconcile".to_string()));
    net.tick(1_000);
    assert!(
        net.log[1].contains(&"Reconcile".to_string()),
        "{:?}",
        net.log[1]
    );
}

#[test]
fn a_report_is_written_only_when_it_changed_and_values_at_most_every_thirty_seconds() {
    use crdt_state::fleet::device::DeviceReport;
    let mut net = Net::new(1, anchor_and_nodes);
    let node_doc = |net: &Net| net.cores[1].node_doc();
    let heads = |net: &Net| {
        net.cores[1]
            .doc(&node_doc(net))
            .map(|d| d.heads())
            .unwrap_or_default()
    };
    let dev = |v: i64, online: bool| {
        BTreeMap::from([(
            "meter".to_string(),
            DeviceReport {
                online: Some(online),
                values: BTreeMap::from([("kw".to_string(), serde_json::json!(v))]),
                ..DeviceReport::default()
            },
        )])
    };
    let report = |net: &mut Net, devices| {
        net.devices[1] = devices;
        let now = net.now;
        net.cores[1].report(
            now,
            BTreeMap::new(),
            net.devices[1].clone(),
            BTreeMap::new(),
        );
        net.act(1);
    };
    report(&mut net, dev(1, true));
    let first = heads(&net);
    assert!(!first.is_empty());
    // The same report: nothing written.
    report(&mut net, dev(1, true));
    assert_eq!(heads(&net), first);
    // Only a value moved, 10 s later: not yet.
    net.now.mono_ms += 10_000;
    report(&mut net, dev(2, true));
    assert_eq!(heads(&net), first);
    // A state change goes out at once.
    report(&mut net, dev(2, false));
    let second = heads(&net);
    assert_ne!(second, first);
    // Values again: after 30 s they are written.
    net.now.mono_ms += 29_000;
    report(&mut net, dev(3, false));
    assert_eq!(heads(&net), second);
    net.now.mono_ms += 1_000;
    report(&mut net, dev(3, false));
    assert_ne!(heads(&net), second);
    let third = heads(&net);

    // The uplink's backlog: its coming goes out at once, its figures with
    // the values (not more often), its going at once.
    use crdt_state::fleet::model::{NodeReport, UplinkReport};
    let backlog = |records| {
        Some(UplinkReport {
            records,
            oldest_ms: 1_000,
            summarised: 0,
        })
    };
    let reported = |net: &Net| {
        net.cores[1]
            .doc(&node_doc(net))
            .map(NodeReport::read)
            .and_then(|r| r.uplink)
    };
    net.cores[1].set_uplink(backlog(500));
    report(&mut net, dev(3, false));
    assert_ne!(heads(&net), third);
    assert_eq!(reported(&net).map(|u| u.records), Some(500));
    let fourth = heads(&net);
    net.now.mono_ms += 1_000;
    net.cores[1].set_uplink(backlog(400));
    report(&mut net, dev(3, false));
    assert_eq!(heads(&net), fourth, "figures wait for the values' turn");
    net.now.mono_ms += 30_000;
    report(&mut net, dev(3, false));
    assert_eq!(reported(&net).map(|u| u.records), Some(400));
    net.cores[1].set_uplink(None);
    report(&mut net, dev(3, false));
    assert_eq!(reported(&net), None, "caught up: said at once");
}

#[test]
fn sync_states_and_peers_are_saved_at_the_flush_interval_not_per_frame() {
    let mut net = Net::new(1, anchor_and_nodes);
    net.connect(0, 1);
    net.settle();
    net.edit(0, "apps.web.image", "nginx:1");
    net.act(0);
    net.settle();
    assert_eq!(net.saved_states[0], 0, "nothing saved before the interval");
    assert!(net.saved_peers[0].is_none());
    net.tick(5_000);
    assert!(net.saved_states[0] > 0);
    let peers = net.saved_peers[0].clone().unwrap();
    assert_eq!(
        peers,
        vec!["/ip4/10.0.0.1/udp/7411/quic-v1/p2p/peer1".to_string()]
    );
    // The same peer from another address replaces the old one.
    let hello = net.hello_of(1);
    let key = net.ids[1].key();
    let now = net.now;
    let arrival = Arrival {
        conn: 1,
        bytes: &hello,
        proves: &|k| *k == key,
        from: "n1",
        dialable: Some("/ip4/10.0.0.9/udp/7411/quic-v1/p2p/peer1".into()),
    };
    net.cores[0].hello(now, arrival, &mut |_| Vec::new());
    net.act(0);
    net.tick(5_000);
    assert_eq!(
        net.saved_peers[0].clone().unwrap(),
        vec!["/ip4/10.0.0.9/udp/7411/quic-v1/p2p/peer1".to_string()]
    );
}

#[test]
fn the_timeline_names_merged_writers_and_leaves_out_local_writes() {
    let mut net = Net::new(1, anchor_and_nodes);
    net.connect(0, 1);
    net.settle();
    // A local write on the anchor: no "merged" entry.
    net.edit(0, "apps.web.image", "nginx:1");
    net.act(0);
    net.settle();
    assert!(
        !net.log[0].iter().any(|l| l.contains("merged")),
        "{:?}",
        net.log[0]
    );
    // An operator's edit made on the node (offline, then synced) is a merge.
    let op = net.operator.clone();
    let ops = BTreeMap::from([("apps.db.image".to_string(), Some("\"pg\"".to_string()))]);
    let now = net.now;
    net.cores[1].write(now, &DocId::Fleet, &op, &ops).unwrap();
    net.act(1);
    net.settle();
    let merged: Vec<&String> = net.log[0].iter().filter(|l| l.contains("merged")).collect();
    assert_eq!(merged.len(), 1, "{:?}", net.log[0]);
    // The node's own reports are no timeline entries.
    assert!(!merged[0].contains("node/"), "{merged:?}");
}

#[test]
fn many_cores_in_a_chain_converge_and_every_store_holds_every_change() {
    let n = 12;
    let mut net = Net::new(n, anchor_and_nodes);
    for i in 0..n {
        net.connect(i, i + 1);
    }
    net.settle();
    let mut hashes = Vec::new();
    for k in 0..5 {
        hashes.push(net.edit(k * 2, &format!("apps.a{k}.image"), "x"));
        net.act(k * 2);
    }
    net.settle();
    for i in 0..=n {
        for h in &hashes {
            assert!(net.fleet_has(i, h), "core {i}");
            assert!(net.stored[i].contains(h), "core {i} did not commit {h}");
        }
    }
}

#[test]
fn a_commit_carries_a_snapshot_once_enough_changes_are_stored() {
    let mut net = Net::new(0, |_| Settings {
        compact_after: 3,
        ..Settings::default()
    });
    for k in 0..5 {
        net.edit(0, &format!("apps.a{k}.image"), "x");
        net.act(0);
    }
    let commits: Vec<&String> = net.log[0]
        .iter()
        .filter(|l| l.starts_with("commit"))
        .collect();
    assert_eq!(
        commits,
        vec![
            "commit 1",
            "commit 2",
            "commit 3 snapshot fleet",
            "commit 4",
            "commit 5",
        ],
        "{:?}",
        net.log[0]
    );
}

#[test]
fn the_committed_mark_reaches_a_write_only_after_its_commit() {
    let mut net = Net::new(1, anchor_and_nodes);
    net.connect(0, 1);
    net.settle();
    net.edit(0, "apps.web.image", "nginx:1");
    let mark = net.cores[0].applied_mark();
    assert!(net.cores[0].committed_mark() < mark);
    let Some(Action::Commit { batch, .. }) = net.cores[0].poll_action() else {
        panic!("a commit first");
    };
    assert!(
        net.cores[0].committed_mark() < mark,
        "not before the answer"
    );
    let now = net.now;
    net.cores[0].committed(now, batch, Ok(()));
    assert!(net.cores[0].committed_mark() >= mark);
}

#[test]
fn the_one_write_path_checks_authority_and_revocation_before_writing_anything() {
    let mut net = Net::new(1, anchor_and_nodes);
    let now = net.now;
    let op = net.operator.clone();
    let node = net.ids[1].clone();
    let set = |k: &str| BTreeMap::from([(k.to_string(), Some("\"x\"".to_string()))]);
    // A node may write its own document, not the fleet: nothing of the
    // batch is written, not even the allowed part.
    let own = net.cores[1].node_doc();
    let e = net.cores[1]
        .write_many(
            now,
            &[
                (own.clone(), set("report.x")),
                (DocId::Fleet, set("apps.a.image")),
            ],
            &node,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("may not write fleet"), "{e}");
    assert!(
        net.cores[1].doc(&own).is_none(),
        "the allowed part was written"
    );
    // The operator writes two documents in one call: one commit.
    let n = net.cores[0]
        .write_many(
            now,
            &[
                (DocId::Fleet, set("apps.a.image")),
                (DocId::Site("a".into()), set("apps.a.paused")),
            ],
            &op,
            Some("alice through the anchor API"),
        )
        .unwrap();
    assert_eq!(n, 2);
    net.act(0);
    assert_eq!(
        net.log[0]
            .iter()
            .filter(|l| l.starts_with("commit"))
            .count(),
        1
    );
    // Revoked: refused, whoever holds the key.
    let key = op.key();
    let ops = BTreeMap::from([(
        format!("revoked.{key}"),
        Some(r#"{"reason":"left","accepted":{}}"#.to_string()),
    )]);
    net.cores[0].write(now, &DocId::Fleet, &op, &ops).unwrap();
    let e = net.cores[0]
        .write_many(now, &[(DocId::Fleet, set("apps.b.image"))], &op, None)
        .unwrap_err();
    assert!(e.to_string().contains("revoked"), "{e}");
}

#[test]
fn a_failing_disk_stops_the_inflow_instead_of_holding_without_bound() {
    let mut net = Net::new(2, |i| Settings {
        max_held: 20,
        ..anchor_and_nodes(i)
    });
    net.connect(1, 0);
    net.connect(1, 2);
    net.settle();
    net.failing[1] = true;
    // Changes keep arriving at node 1 while its commits fail.
    let mut k = 0;
    while net.cores[1].held() <= 20 && k < 200 {
        net.edit(0, &format!("apps.a{k}.image"), "x");
        net.act(0);
        net.settle();
        k += 1;
    }
    assert!(k < 200, "nothing was held");
    // Past the bound: both peers cut off, nothing more comes in.
    let cut = net.log[1]
        .iter()
        .filter(|l| l.starts_with("Disconnect"))
        .count();
    assert_eq!(cut, 2, "{:?}", net.log[1]);
    let hello = net.hello_of(0);
    let key = net.ids[0].key();
    let now = net.now;
    let arrival = Arrival {
        conn: 0,
        bytes: &hello,
        proves: &|k| *k == key,
        from: "anchor",
        dialable: None,
    };
    net.cores[1].hello(now, arrival, &mut |_| Vec::new());
    assert!(
        matches!(net.cores[1].poll_action(), Some(Action::Reject { .. })),
        "admitted while its commits fail"
    );
    // The disk recovers: what was held is stored, peers are admitted again
    // and everything converges.
    net.failing[1] = false;
    net.tick(1000);
    net.settle();
    assert_eq!(net.cores[1].held(), 0);
    net.connect(1, 0);
    net.connect(1, 2);
    net.settle();
    let last = net.edit(0, "apps.last.image", "y");
    net.act(0);
    net.settle();
    assert!(net.fleet_has(1, &last) && net.fleet_has(2, &last));
    assert!(net.stored[1].contains(&last));
}

#[test]
fn no_report_piles_up_while_commits_fail() {
    let mut net = Net::new(1, anchor_and_nodes);
    net.connect(0, 1);
    net.settle();
    let device = |v: i64| {
        BTreeMap::from([(
            "meter".to_string(),
            crdt_state::fleet::device::DeviceReport {
                online: Some(v % 2 == 0),
                ..Default::default()
            },
        )])
    };
    net.devices[1] = device(0);
    net.tick(1000);
    net.settle();
    net.failing[1] = true;
    // A change that cannot be committed, then a device that keeps changing
    // state (each a report the node would write at once).
    net.edit(1, "x", "y");
    net.act(1);
    assert!(net.cores[1].held() > 0);
    // Changes applied and waiting for a commit (frames and notices queue
    // behind them, within `max_held`).
    let applied = net.cores[1].applied_mark();
    for v in 1..50 {
        net.devices[1] = device(v);
        net.tick(31_000);
    }
    assert_eq!(
        net.cores[1].applied_mark(),
        applied,
        "reports piled up in memory"
    );
    // The disk recovers: the latest state is reported.
    net.failing[1] = false;
    net.tick(1000);
    net.settle();
    assert_eq!(net.cores[1].held(), 0);
    let report = net.cores[1].last_report().expect("a report");
    assert_eq!(report.devices["meter"].online, Some(false), "device(49)");
}
