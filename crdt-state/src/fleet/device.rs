//! Field devices: profiles (what a kind of device holds, resource by
//! resource, in the shape of EdgeX device profiles and KubeEdge device
//! models), devices (one instance: its profile, node, protocol, address,
//! polling), and setpoints. Also the one Modbus [`Table`] and the pure
//! register codec ([`decode`], [`encode`], [`scaled`], [`unscale`]): the
//! conversion between a resource's raw registers and its value, which the
//! `adapters` crate uses for every protocol.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A Modbus table (the one definition: `adapters` re-exports it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Table {
    /// Read/write bits.
    Coils,
    /// Read-only bits.
    DiscreteInputs,
    /// Read-only registers.
    InputRegisters,
    /// Read/write registers.
    HoldingRegisters,
}

impl Table {
    /// Whether the table holds bits.
    pub fn is_bits(&self) -> bool {
        matches!(self, Table::Coils | Table::DiscreteInputs)
    }

    /// Whether the protocol allows writing it.
    pub fn writable(&self) -> bool {
        matches!(self, Table::Coils | Table::HoldingRegisters)
    }
}

/// A value's type (raw on the wire, or as reported).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// A bit (or a register, non-zero = true).
    Bool,
    /// 16-bit signed.
    Int16,
    /// 16-bit unsigned.
    Uint16,
    /// 32-bit signed (2 registers).
    Int32,
    /// 32-bit unsigned (2 registers).
    Uint32,
    /// 64-bit signed (4 registers).
    Int64,
    /// 64-bit unsigned (4 registers).
    Uint64,
    /// IEEE 754 single (2 registers).
    Float32,
    /// IEEE 754 double (4 registers).
    Float64,
    /// Text, two bytes per register (`length` registers).
    String,
}

impl ValueType {
    /// Registers the type takes (strings: their `length`).
    pub fn registers(&self, length: Option<u16>) -> u32 {
        match self {
            ValueType::Bool | ValueType::Int16 | ValueType::Uint16 => 1,
            ValueType::Int32 | ValueType::Uint32 | ValueType::Float32 => 2,
            ValueType::Int64 | ValueType::Uint64 | ValueType::Float64 => 4,
            ValueType::String => u32::from(length.unwrap_or(0)),
        }
    }
}

/// Who may write a resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Read only.
    #[default]
    Read,
    /// Read and write (setpoints).
    ReadWrite,
}

/// One resource of a profile: a register (range), a bit, or an OPC UA node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resource {
    /// Its name (unique in the profile).
    pub name: String,
    /// Modbus table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<Table>,
    /// 0-based Modbus address in the table.
    #[serde(default)]
    pub offset: u16,
    /// OPC UA node id (`ns=2;s=Boiler.Temp`), instead of table and offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The type on the wire (default: `valueType`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_type: Option<ValueType>,
    /// The type reported.
    pub value_type: ValueType,
    /// Registers of a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u16>,
    /// Swap the two bytes of every register.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub byte_swap: bool,
    /// Low word first (32/64-bit values).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub word_swap: bool,
    /// value = raw × scale + valueOffset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// See `scale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_offset: Option<f64>,
    /// Read only, or read and write.
    #[serde(default)]
    pub access: Access,
    /// Units, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<String>,
    /// Smallest value a setpoint may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    /// Largest value a setpoint may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    /// Put its last value into the node's report (for the operator).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub report: bool,
}

impl Resource {
    /// The type on the wire.
    pub fn raw(&self) -> ValueType {
        self.raw_type.unwrap_or(self.value_type)
    }

    /// Registers (or bits) it spans.
    pub fn span(&self) -> u32 {
        match self.table {
            Some(t) if t.is_bits() => 1,
            _ => self.raw().registers(self.length),
        }
    }
}

/// `kind: DeviceProfile`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfileSpec {
    /// Manufacturer, model: for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The resources.
    pub resources: Vec<Resource>,
}

/// How a device is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Modbus over TCP.
    ModbusTcp,
    /// Modbus RTU over a serial line.
    ModbusRtu,
    /// OPC UA (binary, no security).
    Opcua,
}

/// A Modbus TCP address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpAddress {
    /// Host name or IP.
    pub host: String,
    /// Port (502).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Unit id (1).
    #[serde(default = "default_unit")]
    pub unit: u8,
}

fn default_port() -> u16 {
    502
}
fn default_unit() -> u8 {
    1
}
fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    1000
}

/// Serial parity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// None.
    #[default]
    None,
    /// Even.
    Even,
    /// Odd.
    Odd,
}

/// A Modbus RTU address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RtuAddress {
    /// Serial device (`/dev/ttyUSB0`).
    pub path: String,
    /// Baud rate (9600).
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Parity (none).
    #[serde(default)]
    pub parity: Parity,
    /// Data bits (8).
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// Stop bits (1).
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Unit id (1).
    #[serde(default = "default_unit")]
    pub unit: u8,
}

/// An OPC UA address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcUaAddress {
    /// `opc.tcp://host:4840/path`.
    pub endpoint: String,
}

/// `kind: Device`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeviceSpec {
    /// Its profile.
    pub profile: String,
    /// The node it is wired to.
    pub node: String,
    /// How it is reached.
    pub protocol: Protocol,
    /// Modbus TCP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpAddress>,
    /// Modbus RTU address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtu: Option<RtuAddress>,
    /// OPC UA address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opcua: Option<OpcUaAddress>,
    /// Poll interval (ms) of every resource without its own.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Poll interval per resource (ms).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub poll: BTreeMap<String, u64>,
    /// Timeout of every device call (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Desired values of writable resources.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub setpoints: BTreeMap<String, serde_json::Value>,
}

/// A site's override of one device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceOverride {
    /// Setpoints on top of the device's.
    #[serde(default)]
    pub setpoints: BTreeMap<String, serde_json::Value>,
}

type Invalid = (String, String);

/// Checks a profile: names, tables, spans within 65,536, types that fit the
/// table, writes only where the protocol allows them, sane limits.
pub fn validate_profile(p: &DeviceProfileSpec) -> Result<(), Invalid> {
    if p.resources.is_empty() {
        return Err((
            "resources".into(),
            "a profile needs at least one resource".into(),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, r) in p.resources.iter().enumerate() {
        let at = |f: &str| format!("resources[{i}].{f}");
        crate::fleet::model::validate_name("resource", &r.name).map_err(|m| (at("name"), m))?;
        if !seen.insert(r.name.as_str()) {
            return Err((
                at("name"),
                format!("resource {:?} is declared twice", r.name),
            ));
        }
        match (&r.table, &r.node_id) {
            (Some(_), Some(_)) => {
                return Err((
                    at("nodeId"),
                    "give a Modbus table or an OPC UA node id, not both".into(),
                ));
            }
            (None, None) => {
                return Err((at("table"), "missing: coils, discrete-inputs, input-registers or holding-registers (or nodeId for OPC UA)".into()));
            }
            (None, Some(n)) if n.trim().is_empty() => {
                return Err((at("nodeId"), "empty node id".into()));
            }
            _ => {}
        }
        if r.raw() == ValueType::String || r.value_type == ValueType::String {
            if r.table.is_some() && r.length.is_none_or(|l| l == 0) {
                return Err((
                    at("length"),
                    "a string needs its length in registers".into(),
                ));
            }
            if r.raw() != r.value_type {
                return Err((at("rawType"), "a string is reported as a string".into()));
            }
        }
        if let Some(t) = r.table {
            if t.is_bits() && (r.raw() != ValueType::Bool || r.value_type != ValueType::Bool) {
                return Err((
                    at("valueType"),
                    format!("{t:?} hold bits: the type must be bool"),
                ));
            }
            let end = u32::from(r.offset) + r.span();
            if end > 65_536 {
                return Err((
                    at("offset"),
                    format!(
                        "offset {} + {} registers ends at {end}, beyond the 65,536 addresses of a table",
                        r.offset,
                        r.span()
                    ),
                ));
            }
            if r.access == Access::ReadWrite && !t.writable() {
                return Err((
                    at("access"),
                    format!(
                        "{} are read-only in Modbus: read-write is not possible",
                        table_name(t)
                    ),
                ));
            }
        }
        if let Some(s) = r.scale
            && (!s.is_finite() || s == 0.0)
        {
            return Err((at("scale"), "must be a finite, non-zero number".into()));
        }
        if r.value_offset.is_some_and(|o| !o.is_finite()) {
            return Err((at("valueOffset"), "must be a finite number".into()));
        }
        if (r.scale.is_some() || r.value_offset.is_some())
            && matches!(r.value_type, ValueType::Bool | ValueType::String)
        {
            return Err((
                at("scale"),
                "scale and valueOffset apply to numbers only".into(),
            ));
        }
        if let (Some(lo), Some(hi)) = (r.minimum, r.maximum)
            && lo > hi
        {
            return Err((at("minimum"), format!("minimum {lo} is above maximum {hi}")));
        }
    }
    Ok(())
}

fn table_name(t: Table) -> &'static str {
    match t {
        Table::Coils => "coils",
        Table::DiscreteInputs => "discrete inputs",
        Table::InputRegisters => "input registers",
        Table::HoldingRegisters => "holding registers",
    }
}

/// Checks a device on its own (the profile is checked where both are known).
pub fn validate_device(d: &DeviceSpec) -> Result<(), Invalid> {
    crate::fleet::model::validate_name("profile", &d.profile).map_err(|m| ("profile".into(), m))?;
    crate::fleet::model::validate_name("node", &d.node).map_err(|m| ("node".into(), m))?;
    let (need, have) = match d.protocol {
        Protocol::ModbusTcp => ("tcp", d.tcp.is_some()),
        Protocol::ModbusRtu => ("rtu", d.rtu.is_some()),
        Protocol::Opcua => ("opcua", d.opcua.is_some()),
    };
    if !have {
        return Err((
            need.into(),
            format!("missing: the address for protocol {:?}", d.protocol),
        ));
    }
    let extra = [
        ("tcp", d.tcp.is_some()),
        ("rtu", d.rtu.is_some()),
        ("opcua", d.opcua.is_some()),
    ]
    .into_iter()
    .find(|(k, set)| *set && *k != need);
    if let Some((k, _)) = extra {
        return Err((
            k.into(),
            format!("not an address of protocol {:?}", d.protocol),
        ));
    }
    if let Some(r) = &d.rtu {
        if !(5..=8).contains(&r.data_bits) {
            return Err(("rtu.dataBits".into(), "must be 5 to 8".into()));
        }
        if !(1..=2).contains(&r.stop_bits) {
            return Err(("rtu.stopBits".into(), "must be 1 or 2".into()));
        }
    }
    if let Some(o) = &d.opcua
        && !o.endpoint.starts_with("opc.tcp://")
    {
        return Err(("opcua.endpoint".into(), "must start with opc.tcp://".into()));
    }
    if d.poll_ms < 10 {
        return Err(("pollMs".into(), "at least 10 ms".into()));
    }
    for (r, ms) in &d.poll {
        if *ms < 10 {
            return Err((format!("poll.{r}"), "at least 10 ms".into()));
        }
    }
    if !(10..=60_000).contains(&d.timeout_ms) {
        return Err(("timeoutMs".into(), "between 10 and 60,000 ms".into()));
    }
    Ok(())
}

/// Checks a setpoint against its resource: it must exist, be writable, fit
/// its type and its limits. Returns the raw registers (or bit) to write.
pub fn check_setpoint(r: &Resource, v: &serde_json::Value) -> Result<Vec<u16>, String> {
    setpoint_allowed(r, v)?;
    encode(r, v)
}

/// Whether `v` may be written to `r` at all: writable, within its limits
/// (any protocol; Modbus also encodes it with [`check_setpoint`]).
pub fn setpoint_allowed(r: &Resource, v: &serde_json::Value) -> Result<(), String> {
    if r.access != Access::ReadWrite {
        return Err(format!("{} is read-only", r.name));
    }
    if let Some(n) = v.as_f64()
        && (r.minimum.is_some_and(|lo| n < lo) || r.maximum.is_some_and(|hi| n > hi))
    {
        return Err(format!(
            "{n} is outside {}..{}",
            r.minimum.map(|x| x.to_string()).unwrap_or_default(),
            r.maximum.map(|x| x.to_string()).unwrap_or_default()
        ));
    }
    Ok(())
}

/// A resource's value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A bool.
    Bool(bool),
    /// An integer kept exact (no scale).
    Int(i64),
    /// An unsigned integer beyond i64.
    Uint(u64),
    /// A number.
    Float(f64),
    /// Text.
    Text(String),
}

impl Value {
    /// As a number (bools as 0/1), for limits and the time series.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Int(i) => Some(*i as f64),
            Value::Uint(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Text(_) => None,
        }
    }
}

fn words_in_order(r: &Resource, regs: &[u16]) -> Vec<u16> {
    let mut w: Vec<u16> = regs
        .iter()
        .map(|x| if r.byte_swap { x.swap_bytes() } else { *x })
        .collect();
    if r.word_swap {
        w.reverse();
    }
    w
}

/// Turns a resource's registers (high word first unless `wordSwap`) into
/// its value, scale and offset applied.
pub fn decode(r: &Resource, regs: &[u16]) -> Result<Value, String> {
    let need = r.raw().registers(r.length) as usize;
    if regs.len() < need {
        return Err(format!(
            "{}: {} registers read, {need} needed",
            r.name,
            regs.len()
        ));
    }
    let regs = &regs[..need];
    if r.raw() == ValueType::String {
        let mut bytes = Vec::with_capacity(need * 2);
        for w in regs
            .iter()
            .map(|x| if r.byte_swap { x.swap_bytes() } else { *x })
        {
            bytes.extend_from_slice(&w.to_be_bytes());
        }
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        return Ok(Value::Text(String::from_utf8_lossy(&bytes).into_owned()));
    }
    let w = words_in_order(r, regs);
    let mut bytes = Vec::with_capacity(8);
    for x in &w {
        bytes.extend_from_slice(&x.to_be_bytes());
    }
    let raw = match r.raw() {
        ValueType::Bool => Value::Bool(w[0] != 0),
        ValueType::Int16 => Value::Int(i64::from(w[0] as i16)),
        ValueType::Uint16 => Value::Int(i64::from(w[0])),
        ValueType::Int32 => Value::Int(i64::from(i32::from_be_bytes(arr(&bytes)))),
        ValueType::Uint32 => Value::Int(i64::from(u32::from_be_bytes(arr(&bytes)))),
        ValueType::Int64 => Value::Int(i64::from_be_bytes(arr(&bytes))),
        ValueType::Uint64 => {
            let u = u64::from_be_bytes(arr(&bytes));
            i64::try_from(u).map(Value::Int).unwrap_or(Value::Uint(u))
        }
        ValueType::Float32 => Value::Float(f64::from(f32::from_be_bytes(arr(&bytes)))),
        ValueType::Float64 => Value::Float(f64::from_be_bytes(arr(&bytes))),
        ValueType::String => Value::Text(String::new()),
    };
    Ok(scaled(r, raw))
}

/// A bit's value.
pub fn decode_bit(bit: bool) -> Value {
    Value::Bool(bit)
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// Applies a resource's scale and offset (and its value type) to a raw
/// value read from the device.
pub fn scaled(r: &Resource, raw: Value) -> Value {
    if r.scale.is_none() && r.value_offset.is_none() {
        return match (r.value_type, raw) {
            (ValueType::Float32 | ValueType::Float64, Value::Int(i)) => Value::Float(i as f64),
            (ValueType::Bool, v) => Value::Bool(v.as_f64().is_some_and(|x| x != 0.0)),
            (_, v) => v,
        };
    }
    let x = raw.as_f64().unwrap_or(0.0) * r.scale.unwrap_or(1.0) + r.value_offset.unwrap_or(0.0);
    match r.value_type {
        ValueType::Float32 | ValueType::Float64 => Value::Float(x),
        _ => Value::Int(x.round() as i64),
    }
}

/// The raw number that reads as `x` once scaled: the inverse of
/// [`scaled`]'s `raw × scale + valueOffset`.
pub fn unscale(r: &Resource, x: f64) -> f64 {
    (x - r.value_offset.unwrap_or(0.0)) / r.scale.unwrap_or(1.0)
}

/// The registers (or, for a bit, `[0]`/`[1]`) that write `v` to `r`, the
/// inverse of [`decode`].
pub fn encode(r: &Resource, v: &serde_json::Value) -> Result<Vec<u16>, String> {
    if r.table.is_some_and(|t| t.is_bits()) || r.raw() == ValueType::Bool {
        let b = match v {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Number(n) if n.as_f64() == Some(0.0) => false,
            serde_json::Value::Number(n) if n.as_f64() == Some(1.0) => true,
            other => return Err(format!("{}: {other} is not a bool", r.name)),
        };
        return Ok(vec![u16::from(b)]);
    }
    if r.raw() == ValueType::String {
        let s = v
            .as_str()
            .ok_or_else(|| format!("{}: {v} is not a string", r.name))?;
        let len = usize::from(r.length.unwrap_or(0)) * 2;
        if s.len() > len {
            return Err(format!("{}: {} bytes do not fit in {len}", r.name, s.len()));
        }
        let mut bytes = s.as_bytes().to_vec();
        bytes.resize(len, 0);
        return Ok(bytes
            .chunks(2)
            .map(|c| {
                let w = u16::from_be_bytes([c[0], c[1]]);
                if r.byte_swap { w.swap_bytes() } else { w }
            })
            .collect());
    }
    let x = v
        .as_f64()
        .ok_or_else(|| format!("{}: {v} is not a number", r.name))?;
    let raw = unscale(r, x);
    let int = |lo: f64, hi: f64| -> Result<i128, String> {
        let i = raw.round();
        if !(lo..=hi).contains(&i) {
            return Err(format!("{}: {x} does not fit a {:?}", r.name, r.raw()));
        }
        Ok(i as i128)
    };
    let bytes: Vec<u8> = match r.raw() {
        ValueType::Int16 => (int(-32768.0, 32767.0)? as i16).to_be_bytes().to_vec(),
        ValueType::Uint16 => (int(0.0, 65535.0)? as u16).to_be_bytes().to_vec(),
        ValueType::Int32 => (int(i32::MIN as f64, i32::MAX as f64)? as i32)
            .to_be_bytes()
            .to_vec(),
        ValueType::Uint32 => (int(0.0, u32::MAX as f64)? as u32).to_be_bytes().to_vec(),
        ValueType::Int64 => (int(i64::MIN as f64, i64::MAX as f64)? as i64)
            .to_be_bytes()
            .to_vec(),
        ValueType::Uint64 => (int(0.0, u64::MAX as f64)? as u64).to_be_bytes().to_vec(),
        ValueType::Float32 => (raw as f32).to_be_bytes().to_vec(),
        ValueType::Float64 => raw.to_be_bytes().to_vec(),
        ValueType::Bool | ValueType::String => Vec::new(),
    };
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    if r.word_swap {
        words.reverse();
    }
    Ok(words
        .into_iter()
        .map(|w| if r.byte_swap { w.swap_bytes() } else { w })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(t: ValueType) -> Resource {
        Resource {
            name: "r".into(),
            table: Some(Table::HoldingRegisters),
            offset: 0,
            node_id: None,
            raw_type: None,
            value_type: t,
            length: None,
            byte_swap: false,
            word_swap: false,
            scale: None,
            value_offset: None,
            access: Access::ReadWrite,
            units: None,
            minimum: None,
            maximum: None,
            report: false,
        }
    }

    #[test]
    fn float32_in_both_word_orders() {
        let v: f32 = 21.5;
        let b = v.to_be_bytes();
        let hi = u16::from_be_bytes([b[0], b[1]]);
        let lo = u16::from_be_bytes([b[2], b[3]]);
        let mut r = res(ValueType::Float32);
        assert_eq!(decode(&r, &[hi, lo]).unwrap(), Value::Float(21.5));
        r.word_swap = true;
        assert_eq!(decode(&r, &[lo, hi]).unwrap(), Value::Float(21.5));
        assert_eq!(encode(&r, &serde_json::json!(21.5)).unwrap(), vec![lo, hi]);
        r.byte_swap = true;
        assert_eq!(
            decode(&r, &[lo.swap_bytes(), hi.swap_bytes()]).unwrap(),
            Value::Float(21.5)
        );
    }

    #[test]
    fn scale_offset_and_round_trip() {
        let mut r = res(ValueType::Float64);
        r.raw_type = Some(ValueType::Int16);
        r.scale = Some(0.1);
        r.value_offset = Some(-40.0);
        // raw 625 → 62.5 - 40 = 22.5
        assert_eq!(decode(&r, &[625]).unwrap(), Value::Float(22.5));
        assert_eq!(encode(&r, &serde_json::json!(22.5)).unwrap(), vec![625]);
        let neg = encode(&r, &serde_json::json!(-50.0)).unwrap();
        assert_eq!(decode(&r, &neg).unwrap(), Value::Float(-50.0));
        assert!(encode(&r, &serde_json::json!(1e9)).is_err());
        let r64 = res(ValueType::Uint64);
        let w = encode(&r64, &serde_json::json!(u32::MAX as u64 + 7)).unwrap();
        assert_eq!(w.len(), 4);
        assert_eq!(decode(&r64, &w).unwrap(), Value::Int(u32::MAX as i64 + 7));
    }

    #[test]
    fn unscale_inverts_scaled() {
        let mut r = res(ValueType::Float64);
        r.raw_type = Some(ValueType::Int16);
        r.scale = Some(0.5);
        r.value_offset = Some(10.0);
        assert_eq!(unscale(&r, 22.5), 25.0);
        assert_eq!(scaled(&r, Value::Int(25)), Value::Float(22.5));
        let plain = res(ValueType::Int32);
        assert_eq!(unscale(&plain, -7.0), -7.0);
    }

    #[test]
    fn strings_and_bits() {
        let mut r = res(ValueType::String);
        r.length = Some(3);
        let w = encode(&r, &serde_json::json!("ABCD")).unwrap();
        assert_eq!(w, vec![0x4142, 0x4344, 0]);
        assert_eq!(decode(&r, &w).unwrap(), Value::Text("ABCD".into()));
        assert!(encode(&r, &serde_json::json!("ABCDEFG")).is_err());
        let mut b = res(ValueType::Bool);
        b.table = Some(Table::Coils);
        assert_eq!(encode(&b, &serde_json::json!(true)).unwrap(), vec![1]);
        assert!(encode(&b, &serde_json::json!("yes")).is_err());
    }

    #[test]
    fn profile_checks_name_the_field() {
        let mut p = DeviceProfileSpec {
            description: None,
            resources: vec![res(ValueType::Float32)],
        };
        assert!(validate_profile(&p).is_ok());
        p.resources[0].offset = 65535;
        let e = validate_profile(&p).unwrap_err();
        assert_eq!(e.0, "resources[0].offset");
        assert!(e.1.contains("65,536"), "{}", e.1);
        p.resources[0].offset = 0;
        p.resources[0].table = Some(Table::InputRegisters);
        assert_eq!(validate_profile(&p).unwrap_err().0, "resources[0].access");
        p.resources[0].access = Access::Read;
        assert!(validate_profile(&p).is_ok());
        p.resources[0].table = Some(Table::Coils);
        assert_eq!(
            validate_profile(&p).unwrap_err().0,
            "resources[0].valueType"
        );
        p.resources[0].table = None;
        assert_eq!(validate_profile(&p).unwrap_err().0, "resources[0].table");
    }

    #[test]
    fn setpoints_respect_access_and_limits() {
        let mut r = res(ValueType::Float32);
        r.minimum = Some(0.0);
        r.maximum = Some(100.0);
        assert!(check_setpoint(&r, &serde_json::json!(50)).is_ok());
        assert!(
            check_setpoint(&r, &serde_json::json!(101))
                .unwrap_err()
                .contains("outside")
        );
        r.access = Access::Read;
        assert!(
            check_setpoint(&r, &serde_json::json!(5))
                .unwrap_err()
                .contains("read-only")
        );
    }
}

/// How a setpoint stands, as the node reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetpointReport {
    /// The value asked for.
    pub desired: serde_json::Value,
    /// Written and read back equal.
    pub applied: bool,
    /// The value read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_back: Option<serde_json::Value>,
    /// Why it was not applied (the device's refusal, a limit, a type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One device, as its node reports it in its document (only on change;
/// reported values at most every 30 s).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceReport {
    /// Answering (None: not polled yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// The last error (unreachable, or a resource's exception).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Last values of the resources marked `report`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, serde_json::Value>,
    /// Setpoints.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub setpoints: BTreeMap<String, SetpointReport>,
}
