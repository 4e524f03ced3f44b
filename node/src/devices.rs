//! The node's devices: one polling task per device wired to this node,
//! readings to the loop, setpoints written and read back. Every protocol
//! goes through the one polling loop here, over an
//! [`adapters::FieldAdapter`]: Modbus and OPC UA differ only in how they
//! plan, read and write.
//!
//! The daemon computes which devices are this node's (the fleet's devices
//! naming it, the profile they use, the setpoints of the device and of the
//! site's override on top) at every reconcile and hands them to
//! [`Devices::reconcile`], which starts, restarts (spec or profile changed)
//! or stops tasks and passes changed setpoints to running ones. A task
//! groups the profile's resources by poll interval and has its adapter plan
//! each group once (Modbus merges contiguous resources of one table into
//! requests of at most 125 registers; OPC UA reads a group's node ids in
//! one request), polls on schedule, and sends [`Update`]s to the loop; a
//! device that does not answer is retried with backoff (1 s doubling to
//! 30 s) without holding up any other device, and reported offline at every
//! round until it answers. Polls started late by whole intervals are
//! counted as missed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use adapters::FieldAdapter;
use adapters::modbus::{Modbus, Target};
use adapters::opcua::OpcUa;
use crdt_state::fleet::device::{DeviceProfileSpec, DeviceSpec, Protocol, Value};
use crdt_state::fleet::model::{FleetView, SiteOverrideSpec};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// A device this node polls, with everything its task needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// The device's name.
    pub name: String,
    /// Its spec.
    pub spec: DeviceSpec,
    /// Its profile (None: the profile is missing from the fleet).
    pub profile: Option<DeviceProfileSpec>,
    /// Desired setpoints (device's, site override's on top).
    pub setpoints: BTreeMap<String, serde_json::Value>,
}

/// The devices of node `me`.
pub fn assigned(
    fleet: &FleetView,
    site: Option<&SiteOverrideSpec>,
    me: &str,
) -> BTreeMap<String, Assignment> {
    fleet
        .devices
        .iter()
        .filter(|(_, d)| d.node == me)
        .map(|(name, d)| {
            let mut setpoints = d.setpoints.clone();
            if let Some(o) = site.and_then(|s| s.devices.get(name)) {
                setpoints.extend(o.setpoints.clone());
            }
            (
                name.clone(),
                Assignment {
                    name: name.clone(),
                    spec: d.clone(),
                    profile: fleet.profiles.get(&d.profile).cloned(),
                    setpoints,
                },
            )
        })
        .collect()
}

/// What a device task tells the loop.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// Values read (or why each could not be).
    Readings {
        /// Device.
        device: String,
        /// Unix ms.
        at_ms: u64,
        /// Per resource.
        values: Vec<(String, Result<Value, String>)>,
    },
    /// Reachability changed, or a poll was missed.
    Status {
        /// Device.
        device: String,
        /// Answering.
        online: bool,
        /// The last error.
        error: Option<String>,
        /// Polls started late by a whole interval or more, since start.
        missed_polls: u64,
    },
    /// A setpoint was written and read back, or refused.
    Setpoint {
        /// Device.
        device: String,
        /// Resource.
        resource: String,
        /// The value read back, or why it was not applied.
        result: Result<Value, String>,
    },
}

/// A device's reachability: backoff (1 s doubling to 30 s) while it does
/// not answer.
struct Reach {
    online: Option<bool>,
    backoff: Duration,
    retry_at: Option<Instant>,
}

impl Reach {
    fn new() -> Reach {
        Reach {
            online: None,
            backoff: Duration::from_secs(1),
            retry_at: None,
        }
    }

    /// Whether a round of calls may run now.
    fn may_try(&self) -> bool {
        self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Records a round's outcome; true when reachability changed.
    fn settle(&mut self, device: &str, answered: bool) -> bool {
        if answered {
            self.backoff = Duration::from_secs(1);
            self.retry_at = None;
        } else {
            self.retry_at = Some(Instant::now() + self.backoff);
            tracing::debug!(device, backoff = ?self.backoff, "device not answering; backing off");
            self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
        }
        let changed = self.online != Some(answered);
        if changed {
            tracing::info!(device, online = answered, "device reachability changed");
        }
        self.online = Some(answered);
        changed
    }

    /// When to wake: the next poll due, but not before a retry.
    fn next_wake(&self, due: &[Instant]) -> Instant {
        let next = due
            .iter()
            .copied()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        self.retry_at.map_or(next, |r| r.max(next))
    }
}

type Setpoints = BTreeMap<String, serde_json::Value>;

/// Sleeps until `wake`, taking changed setpoints on the way (those already
/// applied with the same value are kept). False: the device was dropped.
async fn wait(
    wake: Instant,
    setpoints: &mut watch::Receiver<Setpoints>,
    desired: &mut Setpoints,
    applied: &mut Setpoints,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(wake.into()) => true,
        changed = setpoints.changed() => {
            if changed.is_err() {
                return false;
            }
            *desired = setpoints.borrow_and_update().clone();
            applied.retain(|k, v| desired.get(k) == Some(v));
            true
        }
    }
}

struct Running {
    assignment: Assignment,
    setpoints: watch::Sender<BTreeMap<String, serde_json::Value>>,
    task: tokio::task::JoinHandle<()>,
}

/// The running device tasks.
pub struct Devices {
    running: BTreeMap<String, Running>,
    tx: mpsc::Sender<Update>,
    pki: std::path::PathBuf,
}

impl Devices {
    /// No devices yet; updates go to `tx`; OPC UA clients keep their
    /// certificate store under `pki`.
    pub fn new(tx: mpsc::Sender<Update>, pki: std::path::PathBuf) -> Devices {
        Devices {
            running: BTreeMap::new(),
            tx,
            pki,
        }
    }

    /// Starts, restarts, updates and stops tasks to match `want`.
    pub fn reconcile(&mut self, want: BTreeMap<String, Assignment>) {
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(r) = self.running.remove(&k) {
                r.task.abort();
                tracing::info!(device = %k, "device no longer ours: polling stopped");
            }
        }
        for (name, a) in want {
            if let Some(r) = self.running.get(&name) {
                // Only the setpoints changed: the running task takes them.
                let mut old = r.assignment.spec.clone();
                old.setpoints = a.spec.setpoints.clone();
                if old == a.spec && r.assignment.profile == a.profile {
                    if r.assignment.setpoints != a.setpoints {
                        let _ = r.setpoints.send(a.setpoints.clone());
                    }
                    if let Some(r) = self.running.get_mut(&name) {
                        r.assignment = a;
                    }
                    continue;
                }
                if let Some(r) = self.running.remove(&name) {
                    r.task.abort();
                }
            }
            let (stx, srx) = watch::channel(a.setpoints.clone());
            let span = tracing::info_span!("device", device = %name);
            let task = tokio::spawn(
                run(a.clone(), srx, self.tx.clone(), self.pki.clone()).instrument(span),
            );
            tracing::info!(device = %name, protocol = ?a.spec.protocol, "polling started");
            self.running.insert(
                name,
                Running {
                    assignment: a,
                    setpoints: stx,
                    task,
                },
            );
        }
    }

    /// Stops every task.
    pub fn shutdown(&mut self) {
        for (_, r) in std::mem::take(&mut self.running) {
            r.task.abort();
        }
    }

    /// The assignment of a running device.
    pub fn get(&self, name: &str) -> Option<&Assignment> {
        self.running.get(name).map(|r| &r.assignment)
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A device's protocol client.
enum Client {
    Modbus(Modbus),
    OpcUa(OpcUa),
}

/// The client for a device, or why there is none.
fn adapter(spec: &DeviceSpec, pki: std::path::PathBuf) -> Result<Client, String> {
    let limit = Duration::from_millis(spec.timeout_ms);
    match spec.protocol {
        Protocol::ModbusTcp => {
            let a = spec.tcp.as_ref().ok_or("no tcp address")?;
            Ok(Client::Modbus(Modbus::new(
                Target::Tcp {
                    host: a.host.clone(),
                    port: a.port,
                },
                a.unit,
                limit,
            )))
        }
        Protocol::ModbusRtu => {
            let a = spec.rtu.as_ref().ok_or("no rtu address")?;
            Ok(Client::Modbus(Modbus::new(
                Target::Rtu {
                    path: a.path.clone(),
                    baud: a.baud,
                    parity: a.parity,
                    data_bits: a.data_bits,
                    stop_bits: a.stop_bits,
                },
                a.unit,
                limit,
            )))
        }
        Protocol::Opcua => {
            let a = spec.opcua.as_ref().ok_or("no opcua address")?;
            Ok(Client::OpcUa(OpcUa::new(&a.endpoint, limit, pki)))
        }
    }
}

/// One device's task: its client, then the polling loop.
async fn run(
    a: Assignment,
    setpoints: watch::Receiver<Setpoints>,
    tx: mpsc::Sender<Update>,
    pki: std::path::PathBuf,
) {
    let offline = |error: String| Update::Status {
        device: a.name.clone(),
        online: false,
        error: Some(error),
        missed_polls: 0,
    };
    let Some(profile) = a.profile.clone() else {
        let _ = tx
            .send(offline(format!(
                "profile {} is not in the fleet",
                a.spec.profile
            )))
            .await;
        return;
    };
    match adapter(&a.spec, pki) {
        Ok(Client::Modbus(dev)) => poll_loop(dev, &a, &profile, setpoints, &tx).await,
        Ok(Client::OpcUa(dev)) => poll_loop(dev, &a, &profile, setpoints, &tx).await,
        Err(e) => {
            let _ = tx.send(offline(e)).await;
        }
    }
}

/// The adapter's plans, one per poll interval (resources without their own
/// interval take the device's), shortest interval first; intervals whose
/// resources the adapter does not read have none.
pub fn plans<A: FieldAdapter>(
    dev: &A,
    profile: &DeviceProfileSpec,
    spec: &DeviceSpec,
) -> Vec<(Duration, A::Plan)> {
    let mut by: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, r) in profile.resources.iter().enumerate() {
        let every = spec.poll.get(&r.name).copied().unwrap_or(spec.poll_ms);
        by.entry(every).or_default().push(i);
    }
    by.into_iter()
        .filter_map(|(ms, members)| {
            dev.plan(profile, &members)
                .map(|p| (Duration::from_millis(ms), p))
        })
        .collect()
}

/// The polling loop, the same for every protocol: setpoints first (a
/// device that cannot be reached keeps them for the next round), then each
/// interval's plan when it is due; reachability, backoff and missed polls
/// accounted here.
async fn poll_loop<A: FieldAdapter>(
    mut dev: A,
    a: &Assignment,
    profile: &DeviceProfileSpec,
    mut setpoints: watch::Receiver<Setpoints>,
    tx: &mpsc::Sender<Update>,
) {
    let groups = plans(&dev, profile, &a.spec);
    tracing::debug!(
        protocol = dev.protocol(),
        groups = groups.len(),
        "polls planned"
    );
    let start = Instant::now();
    let mut due: Vec<Instant> = groups.iter().map(|_| start).collect();
    let mut reach = Reach::new();
    let mut last_error: Option<String> = None;
    let mut missed = 0u64;
    // Setpoints still to write (resource → desired), and what was applied.
    let mut applied: Setpoints = BTreeMap::new();
    let mut desired = setpoints.borrow_and_update().clone();
    loop {
        // Setpoints first: they are what an operator waits for.
        if reach.may_try() {
            for (res, v) in desired.clone() {
                if applied.get(&res) == Some(&v) {
                    continue;
                }
                let result = match profile.resources.iter().find(|r| r.name == res) {
                    Some(r) => dev.write_setpoint(r, &v).await,
                    None => Err(adapters::SetpointError::Refused(format!(
                        "the profile has no resource {res}"
                    ))),
                };
                if let Err(e) = &result
                    && e.unreachable()
                {
                    // Unreachable: retried with the polls.
                    last_error = Some(e.to_string());
                    break;
                }
                applied.insert(res.clone(), v.clone());
                let _ = tx
                    .send(Update::Setpoint {
                        device: a.name.clone(),
                        resource: res,
                        result: result.map_err(|e| e.to_string()),
                    })
                    .await;
            }
        }
        let now = Instant::now();
        let mut polled_any = false;
        let mut failed_transport = false;
        if reach.may_try() {
            for (gi, (every, plan)) in groups.iter().enumerate() {
                if now < due[gi] {
                    continue;
                }
                if now.duration_since(due[gi]) >= *every {
                    missed += now.duration_since(due[gi]).as_millis() as u64
                        / every.as_millis().max(1) as u64;
                }
                // The next slot on the schedule, not "now + every": no drift.
                while due[gi] <= now {
                    due[gi] += *every;
                }
                polled_any = true;
                let at_ms = now_ms();
                let polled = dev.poll(profile, plan).await;
                if let Some(e) = &polled.error {
                    last_error = Some(e.to_string());
                }
                failed_transport = polled.unreachable();
                let _ = tx
                    .send(Update::Readings {
                        device: a.name.clone(),
                        at_ms,
                        values: polled.values,
                    })
                    .await;
                if failed_transport {
                    break;
                }
            }
        }
        if polled_any {
            let now_online = !failed_transport;
            if !now_online {
                // Setpoints are written again once it answers.
                applied.clear();
            }
            // While it does not answer, every round's error is news.
            if reach.settle(&a.name, now_online) || !now_online {
                let _ = tx
                    .send(Update::Status {
                        device: a.name.clone(),
                        online: now_online,
                        error: if now_online { None } else { last_error.clone() },
                        missed_polls: missed,
                    })
                    .await;
            }
        }
        if !wait(
            reach.next_wake(&due),
            &mut setpoints,
            &mut desired,
            &mut applied,
        )
        .await
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adapters::modbus::{MAX_REGISTERS, Span};
    use adapters::{DeviceError, Polled, SetpointError, Table};
    use crdt_state::fleet::device::Resource;

    fn profile(yaml: &str) -> DeviceProfileSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn modbus() -> Modbus {
        let target = Target::Tcp {
            host: "h".into(),
            port: 502,
        };
        Modbus::new(target, 1, Duration::from_secs(1))
    }

    #[test]
    fn plans_merge_neighbours_and_split_at_limits() {
        let p = profile(
            "resources:\n- {name: a, table: holding-registers, offset: 0, valueType: uint16}\n- {name: b, table: holding-registers, offset: 1, valueType: float32}\n- {name: c, table: holding-registers, offset: 200, valueType: uint16}\n- {name: d, table: coils, offset: 5, valueType: bool}\n- {name: e, table: input-registers, offset: 0, valueType: int16}\n",
        );
        let spec: DeviceSpec = serde_yaml::from_str(
            "profile: p\nnode: n\nprotocol: modbus-tcp\ntcp: {host: h}\npoll: {e: 5000}\n",
        )
        .unwrap();
        let g: Vec<(Duration, Vec<Span>)> = plans(&modbus(), &p, &spec);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].0, Duration::from_millis(1000));
        let spans = &g[0].1;
        assert_eq!(spans.len(), 3, "{spans:?}");
        let h: Vec<_> = spans
            .iter()
            .filter(|s| s.table == Table::HoldingRegisters)
            .collect();
        assert_eq!(
            (h[0].start, h[0].count, h[0].members.clone()),
            (0, 3, vec![0, 1])
        );
        assert_eq!((h[1].start, h[1].count), (200, 1));
        assert_eq!(g[1].0, Duration::from_millis(5000));
        assert_eq!(g[1].1[0].table, Table::InputRegisters);
        // 100 adjacent registers: one request; 200: two.
        let many: String = (0..200)
            .map(|i| {
                format!(
                    "- {{name: r{i}, table: holding-registers, offset: {i}, valueType: uint16}}\n"
                )
            })
            .collect();
        let g = plans(&modbus(), &profile(&format!("resources:\n{many}")), &spec);
        assert_eq!(g[0].1.len(), 2);
        assert!(g[0].1.iter().all(|s| s.count <= MAX_REGISTERS));
    }

    /// A scripted adapter: it fails its first `fail` polls (and every
    /// setpoint until then) as a device that cannot be reached would, then
    /// answers each poll with the poll's number. A fake is the point here:
    /// this tests the one polling loop that both Modbus and OPC UA go
    /// through (schedule, missed polls, backoff, status, setpoints), not a
    /// protocol; the protocols run against real simulators in
    /// `tests/devices.rs` and `adapters/tests/`.
    struct Scripted {
        fail: u64,
        polls: u64,
    }

    impl FieldAdapter for Scripted {
        type Plan = Vec<usize>;

        fn protocol(&self) -> &'static str {
            "scripted"
        }

        fn plan(&self, _: &DeviceProfileSpec, members: &[usize]) -> Option<Vec<usize>> {
            Some(members.to_vec())
        }

        async fn poll(&mut self, profile: &DeviceProfileSpec, plan: &Vec<usize>) -> Polled {
            let n = self.polls;
            self.polls += 1;
            let names = plan.iter().map(|i| profile.resources[*i].name.clone());
            if n < self.fail {
                let e = DeviceError::Connect("127.0.0.1:1: connection refused".into());
                return Polled {
                    values: names.map(|r| (r, Err(e.to_string()))).collect(),
                    error: Some(e),
                };
            }
            Polled {
                values: names.map(|r| (r, Ok(Value::Int(n as i64)))).collect(),
                error: None,
            }
        }

        async fn write_setpoint(
            &mut self,
            _: &Resource,
            v: &serde_json::Value,
        ) -> Result<Value, SetpointError> {
            if self.polls < self.fail {
                return Err(SetpointError::Device(DeviceError::Timeout(
                    Duration::from_secs(1),
                )));
            }
            v.as_i64()
                .map(Value::Int)
                .ok_or_else(|| SetpointError::Refused(format!("{v} is not an integer")))
        }
    }

    #[tokio::test]
    async fn the_one_loop_backs_off_counts_missed_polls_and_reports() -> anyhow::Result<()> {
        let spec: DeviceSpec = serde_yaml::from_str(
            "profile: p\nnode: n\nprotocol: modbus-tcp\ntcp: {host: h}\npollMs: 50\n",
        )?;
        let p: DeviceProfileSpec = serde_yaml::from_str(
            "resources:\n- {name: sp, table: holding-registers, offset: 0, valueType: int16, access: read-write}\n",
        )?;
        let a = Assignment {
            name: "dev".into(),
            spec,
            profile: Some(p.clone()),
            setpoints: BTreeMap::from([("sp".to_string(), serde_json::json!(7))]),
        };
        let (tx, mut rx) = mpsc::channel(64);
        let (_stx, srx) = watch::channel(a.setpoints.clone());
        let task = tokio::spawn(async move {
            poll_loop(Scripted { fail: 2, polls: 0 }, &a, &p, srx, &tx).await;
        });
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .ok()
                .flatten()
                .ok_or_else(|| anyhow::anyhow!("no update within 10 s"))
        };
        let mut offline_at = Vec::new();
        // Two rounds that reach nothing: the readings say why, the status
        // is offline at each, and the setpoint waits (nothing reported).
        for round in 0..2 {
            match next().await? {
                Update::Readings { device, values, .. } => {
                    assert_eq!(device, "dev");
                    assert_eq!(values.len(), 1);
                    assert!(
                        values[0]
                            .1
                            .as_ref()
                            .is_err_and(|e| e.contains("connection refused")),
                        "{values:?}"
                    );
                }
                other => anyhow::bail!("round {round}: expected readings, got {other:?}"),
            }
            match next().await? {
                Update::Status {
                    online: false,
                    error: Some(e),
                    missed_polls,
                    ..
                } => {
                    assert!(e.contains("connection refused"), "{e}");
                    offline_at.push((Instant::now(), missed_polls));
                }
                other => anyhow::bail!("round {round}: expected offline, got {other:?}"),
            }
        }
        // The retry waited out the backoff (1 s), so the 50 ms polls it
        // skipped are counted as missed.
        assert!(offline_at[1].0 - offline_at[0].0 >= Duration::from_millis(900));
        assert!(offline_at[1].1 >= 10, "missed {}", offline_at[1].1);
        // Answering again (after a doubled backoff): the setpoint first,
        // then the reading, then online with no error.
        match next().await? {
            Update::Setpoint {
                resource, result, ..
            } => {
                assert_eq!(resource, "sp");
                assert_eq!(result, Ok(Value::Int(7)));
            }
            other => anyhow::bail!("expected the setpoint, got {other:?}"),
        }
        let back_at = Instant::now();
        assert!(back_at - offline_at[1].0 >= Duration::from_millis(1500));
        match next().await? {
            Update::Readings { values, .. } => {
                assert_eq!(values, vec![("sp".to_string(), Ok(Value::Int(2)))]);
            }
            other => anyhow::bail!("expected readings, got {other:?}"),
        }
        match next().await? {
            Update::Status {
                online: true,
                error: None,
                missed_polls,
                ..
            } => assert!(
                missed_polls >= offline_at[1].1 + 30,
                "missed {missed_polls}"
            ),
            other => anyhow::bail!("expected online, got {other:?}"),
        }
        // Online: readings every interval, no status while nothing changes.
        for _ in 0..3 {
            match next().await? {
                Update::Readings { values, .. } => assert!(values[0].1.is_ok(), "{values:?}"),
                other => anyhow::bail!("expected readings, got {other:?}"),
            }
        }
        task.abort();
        Ok(())
    }
}
