//! The node's devices: one polling task per device wired to this node,
//! readings to the loop, setpoints written and read back.
//!
//! The daemon computes which devices are this node's (the fleet's devices
//! naming it, the profile they use, the setpoints of the device and of the
//! site's override on top) at every reconcile and hands them to
//! [`Devices::reconcile`], which starts, restarts (spec or profile changed)
//! or stops tasks and passes changed setpoints to running ones. A task
//! plans its reads (contiguous resources of one table and interval merged
//! into requests of at most 125 registers), polls on schedule, decodes with
//! the profile, and sends [`Update`]s to the loop; a device that does not
//! answer is retried with backoff (1 s doubling to 30 s) without holding up
//! any other device. A read of several resources that the device refuses
//! with an exception is retried resource by resource, so each gets its own
//! error code.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use adapters::modbus::{MAX_REGISTERS, Modbus, Parity, Target};
use adapters::{DeviceError, FieldAdapter, Table, Words};
use crdt_state::device::{self, DeviceProfileSpec, DeviceSpec, Protocol, Resource, Value};
use crdt_state::model::{FleetView, SiteOverrideSpec};
use tokio::sync::{mpsc, watch};

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

/// The raw value a setpoint asks the device for (scale and offset undone).
fn unscaled(r: &Resource, v: &serde_json::Value) -> Result<adapters::opcua::Scalar, String> {
    use adapters::opcua::Scalar;
    match v {
        serde_json::Value::Bool(b) => Ok(Scalar::Bool(*b)),
        serde_json::Value::String(s) => Ok(Scalar::Text(s.clone())),
        serde_json::Value::Number(n) => {
            let x = n.as_f64().ok_or("not a number")?;
            let raw = (x - r.value_offset.unwrap_or(0.0)) / r.scale.unwrap_or(1.0);
            Ok(match r.raw() {
                device::ValueType::Float32 | device::ValueType::Float64 => Scalar::Float(raw),
                _ => Scalar::Int(raw.round() as i64),
            })
        }
        other => Err(format!("{other} is not a scalar")),
    }
}

fn opcua_kind(t: device::ValueType) -> adapters::opcua::Kind {
    use adapters::opcua::Kind;
    match t {
        device::ValueType::Bool => Kind::Boolean,
        device::ValueType::Int16 => Kind::Int16,
        device::ValueType::Uint16 => Kind::UInt16,
        device::ValueType::Int32 => Kind::Int32,
        device::ValueType::Uint32 => Kind::UInt32,
        device::ValueType::Int64 => Kind::Int64,
        device::ValueType::Uint64 => Kind::UInt64,
        device::ValueType::Float32 => Kind::Float,
        device::ValueType::Float64 => Kind::Double,
        device::ValueType::String => Kind::String,
    }
}

fn from_scalar(r: &Resource, v: adapters::opcua::Scalar) -> Result<Value, String> {
    use adapters::opcua::Scalar;
    let raw = match v {
        Scalar::Bool(b) => Value::Bool(b),
        Scalar::Int(i) => Value::Int(i),
        Scalar::Float(f) => Value::Float(f),
        Scalar::Text(t) => Value::Text(t),
    };
    let text_wanted = r.value_type == device::ValueType::String;
    if text_wanted != matches!(raw, Value::Text(_)) {
        return Err(format!(
            "{}: type mismatch: the profile says {:?}, the server holds {raw:?}",
            r.name, r.value_type
        ));
    }
    Ok(device::scaled(r, raw))
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

/// An OPC UA device's task: variables polled by node id per interval.
async fn run_opcua(
    a: Assignment,
    profile: DeviceProfileSpec,
    mut setpoints: watch::Receiver<BTreeMap<String, serde_json::Value>>,
    tx: mpsc::Sender<Update>,
    pki: std::path::PathBuf,
) {
    use adapters::opcua::{OpcUa, node_id};
    let endpoint = a
        .spec
        .opcua
        .as_ref()
        .map(|o| o.endpoint.clone())
        .unwrap_or_default();
    let mut dev = OpcUa::new(&endpoint, Duration::from_millis(a.spec.timeout_ms), pki);
    // Interval → resources (by index) with their node ids.
    let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, r) in profile.resources.iter().enumerate() {
        if r.node_id.is_some() {
            let every = a.spec.poll.get(&r.name).copied().unwrap_or(a.spec.poll_ms);
            groups.entry(every).or_default().push(i);
        }
    }
    let groups: Vec<(Duration, Vec<usize>)> = groups
        .into_iter()
        .map(|(ms, v)| (Duration::from_millis(ms), v))
        .collect();
    let mut due: Vec<Instant> = groups.iter().map(|_| Instant::now()).collect();
    let mut reach = Reach::new();
    let mut applied: Setpoints = BTreeMap::new();
    let mut desired = setpoints.borrow_and_update().clone();
    let mut missed = 0u64;
    loop {
        let mut error: Option<String> = None;
        let mut transport_failed = false;
        if reach.may_try() {
            for (res, v) in desired.clone() {
                if applied.get(&res) == Some(&v) {
                    continue;
                }
                let result: Result<Value, String> = async {
                    let r = profile
                        .resources
                        .iter()
                        .find(|r| r.name == res)
                        .ok_or_else(|| format!("the profile has no resource {res}"))?;
                    device::setpoint_allowed(r, &v)?;
                    let id =
                        node_id(r.node_id.as_deref().unwrap_or("")).map_err(|e| e.to_string())?;
                    let raw = unscaled(r, &v)?;
                    dev.write(&id, &raw, opcua_kind(r.raw()))
                        .await
                        .map_err(|e| e.to_string())?;
                    let back = dev.read(&[id]).await.map_err(|e| e.to_string())?;
                    let value = back.into_iter().next().ok_or("no value read back")??;
                    from_scalar(r, value)
                }
                .await;
                applied.insert(res.clone(), v.clone());
                let _ = tx
                    .send(Update::Setpoint {
                        device: a.name.clone(),
                        resource: res,
                        result,
                    })
                    .await;
            }
            let now = Instant::now();
            for (gi, (every, members)) in groups.iter().enumerate() {
                if now < due[gi] {
                    continue;
                }
                if now.duration_since(due[gi]) >= *every {
                    missed += 1;
                }
                while due[gi] <= now {
                    due[gi] += *every;
                }
                let mut ids = Vec::new();
                let mut values = Vec::new();
                let mut polled = Vec::new();
                for i in members {
                    let r = &profile.resources[*i];
                    match node_id(r.node_id.as_deref().unwrap_or("")) {
                        Ok(id) => {
                            ids.push(id);
                            polled.push(*i);
                        }
                        Err(e) => values.push((r.name.clone(), Err(e.to_string()))),
                    }
                }
                let at_ms = now_ms();
                match dev.read(&ids).await {
                    Ok(results) => {
                        for (i, v) in polled.iter().zip(results) {
                            let r = &profile.resources[*i];
                            values.push((r.name.clone(), v.and_then(|v| from_scalar(r, v))));
                        }
                    }
                    Err(e) => {
                        error = Some(e.to_string());
                        transport_failed = !e.device_answered();
                        for i in &polled {
                            values.push((profile.resources[*i].name.clone(), Err(e.to_string())));
                        }
                    }
                }
                let _ = tx
                    .send(Update::Readings {
                        device: a.name.clone(),
                        at_ms,
                        values,
                    })
                    .await;
                if transport_failed {
                    break;
                }
            }
            let now_online = !transport_failed;
            if !now_online {
                applied.clear();
            }
            if reach.settle(&a.name, now_online) {
                let _ = tx
                    .send(Update::Status {
                        device: a.name.clone(),
                        online: now_online,
                        error,
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
            let task = tokio::spawn(run(a.clone(), srx, self.tx.clone(), self.pki.clone()));
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

fn table(t: device::Table) -> Table {
    match t {
        device::Table::Coils => Table::Coils,
        device::Table::DiscreteInputs => Table::DiscreteInputs,
        device::Table::InputRegisters => Table::InputRegisters,
        device::Table::HoldingRegisters => Table::HoldingRegisters,
    }
}

/// One request: a table range covering some resources.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    /// Table.
    pub table: Table,
    /// First address.
    pub start: u16,
    /// Registers or bits.
    pub count: u16,
    /// Indexes of the profile's resources it covers.
    pub members: Vec<usize>,
}

/// Requests at one interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// How often.
    pub every: Duration,
    /// The requests.
    pub spans: Vec<Span>,
}

/// Plans the requests: per (interval, table), resources sorted by address,
/// merged while the request stays within the protocol's limit and the gap
/// between them is small (reading a few unused registers is cheaper than a
/// request more).
pub fn plan(profile: &DeviceProfileSpec, spec: &DeviceSpec) -> Vec<Group> {
    const GAP: u32 = 8;
    let mut by: BTreeMap<(u64, Table), Vec<usize>> = BTreeMap::new();
    for (i, r) in profile.resources.iter().enumerate() {
        let Some(t) = r.table else { continue };
        let every = spec.poll.get(&r.name).copied().unwrap_or(spec.poll_ms);
        by.entry((every, table(t))).or_default().push(i);
    }
    let mut groups: BTreeMap<u64, Vec<Span>> = BTreeMap::new();
    for ((every, t), mut idx) in by {
        idx.sort_by_key(|i| profile.resources[*i].offset);
        let max = if t.is_bits() {
            2000
        } else {
            u32::from(MAX_REGISTERS)
        };
        let mut spans: Vec<Span> = Vec::new();
        for i in idx {
            let r = &profile.resources[i];
            let start = u32::from(r.offset);
            let end = start + r.span();
            if let Some(last) = spans.last_mut() {
                let last_end = u32::from(last.start) + u32::from(last.count);
                if start <= last_end + GAP && end - u32::from(last.start) <= max {
                    last.count = (end.max(last_end) - u32::from(last.start)) as u16;
                    last.members.push(i);
                    continue;
                }
            }
            spans.push(Span {
                table: t,
                start: r.offset,
                count: r.span() as u16,
                members: vec![i],
            });
        }
        groups.entry(every).or_default().extend(spans);
    }
    groups
        .into_iter()
        .map(|(every, spans)| Group {
            every: Duration::from_millis(every),
            spans,
        })
        .collect()
}

fn value_of(r: &Resource, span_start: u16, words: &Words) -> Result<Value, String> {
    let at = usize::from(r.offset - span_start);
    match words {
        Words::Bits(b) => b
            .get(at)
            .map(|x| device::decode_bit(*x))
            .ok_or_else(|| format!("{}: bit missing from the answer", r.name)),
        Words::Registers(w) => {
            let n = r.span() as usize;
            let slice = w
                .get(at..at + n)
                .ok_or_else(|| format!("{}: registers missing from the answer", r.name))?;
            device::decode(r, slice)
        }
    }
}

fn is_transport(e: &DeviceError) -> bool {
    !e.device_answered()
}

/// The adapter for a device, or why there is none.
fn adapter(spec: &DeviceSpec) -> Result<Modbus, String> {
    let limit = Duration::from_millis(spec.timeout_ms);
    match spec.protocol {
        Protocol::ModbusTcp => {
            let a = spec.tcp.as_ref().ok_or("no tcp address")?;
            Ok(Modbus::new(
                Target::Tcp {
                    host: a.host.clone(),
                    port: a.port,
                },
                a.unit,
                limit,
            ))
        }
        Protocol::ModbusRtu => {
            let a = spec.rtu.as_ref().ok_or("no rtu address")?;
            Ok(Modbus::new(
                Target::Rtu {
                    path: a.path.clone(),
                    baud: a.baud,
                    parity: match a.parity {
                        device::Parity::None => Parity::None,
                        device::Parity::Even => Parity::Even,
                        device::Parity::Odd => Parity::Odd,
                    },
                    data_bits: a.data_bits,
                    stop_bits: a.stop_bits,
                },
                a.unit,
                limit,
            ))
        }
        Protocol::Opcua => Err("not a Modbus device".into()),
    }
}

/// One device's task.
async fn run(
    a: Assignment,
    mut setpoints: watch::Receiver<BTreeMap<String, serde_json::Value>>,
    tx: mpsc::Sender<Update>,
    pki: std::path::PathBuf,
) {
    let status = |online: bool, error: Option<String>, missed: u64| Update::Status {
        device: a.name.clone(),
        online,
        error,
        missed_polls: missed,
    };
    let Some(profile) = a.profile.clone() else {
        let _ = tx
            .send(status(
                false,
                Some(format!("profile {} is not in the fleet", a.spec.profile)),
                0,
            ))
            .await;
        return;
    };
    if a.spec.protocol == Protocol::Opcua {
        return run_opcua(a, profile, setpoints, tx, pki).await;
    }
    let mut dev = match adapter(&a.spec) {
        Ok(d) => d,
        Err(e) => {
            let _ = tx.send(status(false, Some(e), 0)).await;
            return;
        }
    };
    let groups = plan(&profile, &a.spec);
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
                let result = write_setpoint(&mut dev, &profile, &res, &v).await;
                match &result {
                    Err(SetpointError::Device(e)) if is_transport(e) => {
                        // Unreachable: retried with the polls.
                        last_error = Some(e.to_string());
                        break;
                    }
                    _ => {}
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
            for (gi, g) in groups.iter().enumerate() {
                if now < due[gi] {
                    continue;
                }
                if now.duration_since(due[gi]) >= g.every {
                    missed += now.duration_since(due[gi]).as_millis() as u64
                        / g.every.as_millis().max(1) as u64;
                }
                // The next slot on the schedule, not "now + every": no drift.
                while due[gi] <= now {
                    due[gi] += g.every;
                }
                polled_any = true;
                let at_ms = now_ms();
                let mut values = Vec::new();
                for span in &g.spans {
                    match dev.read(span.table, span.start, span.count).await {
                        Ok(words) => {
                            for i in &span.members {
                                let r = &profile.resources[*i];
                                values.push((r.name.clone(), value_of(r, span.start, &words)));
                            }
                        }
                        Err(e) if e.device_answered() && span.members.len() > 1 => {
                            // Find out which resource the device refuses.
                            for i in &span.members {
                                let r = &profile.resources[*i];
                                let one = dev.read(span.table, r.offset, r.span() as u16).await;
                                values.push((
                                    r.name.clone(),
                                    one.map_err(|e| e.to_string())
                                        .and_then(|w| value_of(r, r.offset, &w)),
                                ));
                            }
                        }
                        Err(e) => {
                            let transport = is_transport(&e);
                            for i in &span.members {
                                values
                                    .push((profile.resources[*i].name.clone(), Err(e.to_string())));
                            }
                            last_error = Some(e.to_string());
                            if transport {
                                failed_transport = true;
                                break;
                            }
                        }
                    }
                }
                if values.iter().any(|(_, v)| v.is_ok()) {
                    failed_transport = false;
                }
                let _ = tx
                    .send(Update::Readings {
                        device: a.name.clone(),
                        at_ms,
                        values,
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
                    .send(status(
                        now_online,
                        if now_online { None } else { last_error.clone() },
                        missed,
                    ))
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

#[derive(Debug, thiserror::Error)]
enum SetpointError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Device(DeviceError),
    #[error("read back {0:?}, not the value written")]
    Mismatch(Value),
}

async fn write_setpoint(
    dev: &mut Modbus,
    profile: &DeviceProfileSpec,
    res: &str,
    v: &serde_json::Value,
) -> Result<Value, SetpointError> {
    let r = profile
        .resources
        .iter()
        .find(|r| r.name == res)
        .ok_or_else(|| SetpointError::Refused(format!("the profile has no resource {res}")))?;
    let words = device::check_setpoint(r, v).map_err(SetpointError::Refused)?;
    let t = table(
        r.table
            .ok_or_else(|| SetpointError::Refused(format!("{res} is not a Modbus resource")))?,
    );
    dev.write(t, r.offset, &words)
        .await
        .map_err(SetpointError::Device)?;
    let back = dev
        .read(t, r.offset, r.span() as u16)
        .await
        .map_err(SetpointError::Device)?;
    let value = value_of(r, r.offset, &back).map_err(SetpointError::Refused)?;
    let expect = device::decode(r, &words).ok();
    let same = match (&expect, t.is_bits()) {
        (_, true) => value.as_f64() == v.as_f64().or(v.as_bool().map(|b| f64::from(u8::from(b)))),
        (Some(e), false) => *e == value,
        (None, false) => false,
    };
    if !same {
        return Err(SetpointError::Mismatch(value));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(yaml: &str) -> DeviceProfileSpec {
        serde_yaml::from_str(yaml).unwrap()
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
        let g = plan(&p, &spec);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].every, Duration::from_millis(1000));
        let spans = &g[0].spans;
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
        assert_eq!(g[1].every, Duration::from_millis(5000));
        assert_eq!(g[1].spans[0].table, Table::InputRegisters);
        // 100 adjacent registers: one request; 200: two.
        let many: String = (0..200)
            .map(|i| {
                format!(
                    "- {{name: r{i}, table: holding-registers, offset: {i}, valueType: uint16}}\n"
                )
            })
            .collect();
        let g = plan(&profile(&format!("resources:\n{many}")), &spec);
        assert_eq!(g[0].spans.len(), 2);
        assert!(g[0].spans.iter().all(|s| s.count <= MAX_REGISTERS));
    }
}
