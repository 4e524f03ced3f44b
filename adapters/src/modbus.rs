//! Modbus TCP and RTU through tokio-modbus, with a timeout on every call;
//! its [`FieldAdapter`]: neighbouring resources merged into requests
//! ([`plan`]), answers decoded with `crdt_state::fleet::device`'s register codec,
//! setpoints encoded with it, written and read back.

use std::collections::BTreeMap;
use std::time::Duration;

use crdt_state::fleet::device::{self, DeviceProfileSpec, Resource, Value};
use tokio::time::timeout;
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::slave::Slave;

pub use crdt_state::fleet::device::Parity;

use crate::{DeviceError, FieldAdapter, Polled, SetpointError, Table, Words};

/// Largest read of registers in one request (the protocol's limit).
pub const MAX_REGISTERS: u16 = 125;
/// Largest read of bits in one request.
pub const MAX_BITS: u16 = 2000;

/// Where a Modbus device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// TCP.
    Tcp {
        /// Host name or IP.
        host: String,
        /// Port.
        port: u16,
    },
    /// RTU over a serial line.
    Rtu {
        /// The serial device.
        path: String,
        /// Baud rate.
        baud: u32,
        /// Parity.
        parity: Parity,
        /// Data bits (5–8).
        data_bits: u8,
        /// Stop bits (1–2).
        stop_bits: u8,
    },
}

/// A Modbus device: its target, unit id and call timeout.
pub struct Modbus {
    target: Target,
    unit: u8,
    timeout: Duration,
    ctx: Option<Context>,
}

impl std::fmt::Debug for Modbus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Modbus")
            .field("target", &self.target)
            .field("unit", &self.unit)
            .field("connected", &self.ctx.is_some())
            .finish()
    }
}

impl Modbus {
    /// A device (not connected until the first call).
    pub fn new(target: Target, unit: u8, timeout: Duration) -> Modbus {
        Modbus {
            target,
            unit,
            timeout,
            ctx: None,
        }
    }

    async fn connect(target: Target, unit: u8, limit: Duration) -> Result<Context, DeviceError> {
        let slave = Slave(unit);
        match &target {
            Target::Tcp { host, port } => {
                let addr = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(|e| DeviceError::Connect(format!("{host}:{port}: {e}")))?
                    .next()
                    .ok_or_else(|| DeviceError::Connect(format!("{host}: no address")))?;
                match timeout(limit, tokio_modbus::client::tcp::connect_slave(addr, slave)).await {
                    Err(_) => Err(DeviceError::Timeout(limit)),
                    Ok(Err(e)) => Err(DeviceError::Connect(format!("{addr}: {e}"))),
                    Ok(Ok(ctx)) => Ok(ctx),
                }
            }
            Target::Rtu {
                path,
                baud,
                parity,
                data_bits,
                stop_bits,
            } => {
                let builder = tokio_serial::new(path.as_str(), *baud)
                    .parity(match parity {
                        Parity::None => tokio_serial::Parity::None,
                        Parity::Even => tokio_serial::Parity::Even,
                        Parity::Odd => tokio_serial::Parity::Odd,
                    })
                    .data_bits(match data_bits {
                        5 => tokio_serial::DataBits::Five,
                        6 => tokio_serial::DataBits::Six,
                        7 => tokio_serial::DataBits::Seven,
                        _ => tokio_serial::DataBits::Eight,
                    })
                    .stop_bits(if *stop_bits == 2 {
                        tokio_serial::StopBits::Two
                    } else {
                        tokio_serial::StopBits::One
                    });
                let port = tokio_serial::SerialStream::open(&builder)
                    .map_err(|e| DeviceError::Connect(format!("{path}: {e}")))?;
                // RTU has no transaction ids: bytes of an answer that came
                // too late must not be read as the next one's.
                tokio_serial::SerialPort::clear(&port, tokio_serial::ClearBuffer::All)
                    .map_err(|e| DeviceError::Connect(format!("{path}: {e}")))?;
                Ok(tokio_modbus::client::rtu::attach_slave(port, slave))
            }
        }
    }

    async fn ctx(&mut self) -> Result<&mut Context, DeviceError> {
        if self.ctx.is_none() {
            let ctx = Self::connect(self.target.clone(), self.unit, self.timeout).await?;
            self.ctx = Some(ctx);
        }
        self.ctx
            .as_mut()
            .ok_or_else(|| DeviceError::Connect("no connection".into()))
    }

    /// Maps a call's outcome; transport failures and timeouts drop the connection.
    fn settle<T>(
        &mut self,
        r: Result<tokio_modbus::Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, DeviceError> {
        match r {
            Err(_) => {
                self.ctx = None;
                Err(DeviceError::Timeout(self.timeout))
            }
            Ok(Err(e)) => {
                self.ctx = None;
                Err(DeviceError::Io(e.to_string()))
            }
            Ok(Ok(Err(code))) => Err(DeviceError::Exception { code: code.into() }),
            Ok(Ok(Ok(v))) => Ok(v),
        }
    }
}

impl Modbus {
    /// Reads `count` registers or bits of `table` from `start`.
    pub async fn read(
        &mut self,
        table: Table,
        start: u16,
        count: u16,
    ) -> Result<Words, DeviceError> {
        let max = if table.is_bits() {
            MAX_BITS
        } else {
            MAX_REGISTERS
        };
        if count == 0 || count > max {
            return Err(DeviceError::Invalid(format!(
                "cannot read {count} of {table:?} in one request (1..={max})"
            )));
        }
        let t = self.timeout;
        let ctx = self.ctx().await?;
        let words = match table {
            Table::Coils => {
                let r = timeout(t, ctx.read_coils(start, count)).await;
                self.settle(r).map(Words::Bits)
            }
            Table::DiscreteInputs => {
                let r = timeout(t, ctx.read_discrete_inputs(start, count)).await;
                self.settle(r).map(Words::Bits)
            }
            Table::InputRegisters => {
                let r = timeout(t, ctx.read_input_registers(start, count)).await;
                self.settle(r).map(Words::Registers)
            }
            Table::HoldingRegisters => {
                let r = timeout(t, ctx.read_holding_registers(start, count)).await;
                self.settle(r).map(Words::Registers)
            }
        }?;
        // tokio-modbus passes a short answer through in release builds:
        // an answer of the wrong size is a broken exchange, not data.
        let n = usize::from(count);
        match words {
            Words::Registers(w) if w.len() == n => Ok(Words::Registers(w)),
            Words::Bits(mut b) if b.len() >= n => {
                b.truncate(n);
                Ok(Words::Bits(b))
            }
            other => {
                self.ctx = None;
                let got = match &other {
                    Words::Registers(w) => w.len(),
                    Words::Bits(b) => b.len(),
                };
                Err(DeviceError::Io(format!(
                    "asked for {n} values, the answer holds {got}"
                )))
            }
        }
    }

    /// Writes registers (holding registers) or bits (coils, `0`/`1`) from `start`.
    pub async fn write(
        &mut self,
        table: Table,
        start: u16,
        words: &[u16],
    ) -> Result<(), DeviceError> {
        let t = self.timeout;
        match table {
            Table::DiscreteInputs | Table::InputRegisters => {
                return Err(DeviceError::Invalid(format!("{table:?} cannot be written")));
            }
            _ if words.is_empty() => return Err(DeviceError::Invalid("nothing to write".into())),
            _ => {}
        }
        let ctx = self.ctx().await?;
        match table {
            Table::Coils => {
                let bits: Vec<bool> = words.iter().map(|w| *w != 0).collect();
                let r = if bits.len() == 1 {
                    timeout(t, ctx.write_single_coil(start, bits[0])).await
                } else {
                    timeout(t, ctx.write_multiple_coils(start, &bits)).await
                };
                self.settle(r)
            }
            _ => {
                let r = if words.len() == 1 {
                    timeout(t, ctx.write_single_register(start, words[0])).await
                } else {
                    timeout(t, ctx.write_multiple_registers(start, words)).await
                };
                self.settle(r)
            }
        }
    }

    /// Drops the connection (the next call reconnects).
    pub fn reset(&mut self) {
        self.ctx = None;
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

/// Plans the requests that read `members` (indexes into the profile's
/// resources; those without a table are not Modbus's): per table, sorted by
/// address, merged while the request stays within the protocol's limit and
/// the gap between them is small (reading a few unused registers is cheaper
/// than a request more).
pub fn plan(profile: &DeviceProfileSpec, members: &[usize]) -> Vec<Span> {
    const GAP: u32 = 8;
    let mut by: BTreeMap<Table, Vec<usize>> = BTreeMap::new();
    for &i in members {
        let Some(t) = profile.resources.get(i).and_then(|r| r.table) else {
            continue;
        };
        by.entry(t).or_default().push(i);
    }
    let mut spans: Vec<Span> = Vec::new();
    for (t, mut idx) in by {
        idx.sort_by_key(|i| profile.resources[*i].offset);
        let max = u32::from(if t.is_bits() { MAX_BITS } else { MAX_REGISTERS });
        let first = spans.len();
        for i in idx {
            let r = &profile.resources[i];
            let start = u32::from(r.offset);
            let end = start + r.span();
            if spans.len() > first
                && let Some(last) = spans.last_mut()
            {
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
    }
    spans
}

/// A resource's value out of the answer to a request from `span_start`.
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

impl FieldAdapter for Modbus {
    type Plan = Vec<Span>;

    fn protocol(&self) -> &'static str {
        match self.target {
            Target::Tcp { .. } => "modbus-tcp",
            Target::Rtu { .. } => "modbus-rtu",
        }
    }

    fn plan(&self, profile: &DeviceProfileSpec, members: &[usize]) -> Option<Vec<Span>> {
        let spans = plan(profile, members);
        (!spans.is_empty()).then_some(spans)
    }

    /// A request the device refuses with an exception is asked again
    /// resource by resource, so each gets its own exception code.
    async fn poll(&mut self, profile: &DeviceProfileSpec, spans: &Vec<Span>) -> Polled {
        let mut out = Polled::default();
        for span in spans {
            match self.read(span.table, span.start, span.count).await {
                Ok(words) => {
                    for i in &span.members {
                        let r = &profile.resources[*i];
                        out.values
                            .push((r.name.clone(), value_of(r, span.start, &words)));
                    }
                }
                Err(e) if e.device_answered() && span.members.len() > 1 => {
                    // Find out which resource the device refuses.
                    for i in &span.members {
                        let r = &profile.resources[*i];
                        let one = self.read(span.table, r.offset, r.span() as u16).await;
                        out.values.push((
                            r.name.clone(),
                            one.map_err(|e| e.to_string())
                                .and_then(|w| value_of(r, r.offset, &w)),
                        ));
                    }
                }
                Err(e) => {
                    for i in &span.members {
                        out.values
                            .push((profile.resources[*i].name.clone(), Err(e.to_string())));
                    }
                    let transport = !e.device_answered();
                    out.error = Some(e);
                    if transport {
                        break;
                    }
                }
            }
        }
        out
    }

    /// Encodes with the profile (access, limits, type), writes, reads back
    /// and compares: a device that keeps another value is a mismatch.
    async fn write_setpoint(
        &mut self,
        r: &Resource,
        v: &serde_json::Value,
    ) -> Result<Value, SetpointError> {
        let words = device::check_setpoint(r, v).map_err(SetpointError::Refused)?;
        let t = r.table.ok_or_else(|| {
            SetpointError::Refused(format!("{} is not a Modbus resource", r.name))
        })?;
        self.write(t, r.offset, &words)
            .await
            .map_err(SetpointError::device)?;
        let back = self
            .read(t, r.offset, r.span() as u16)
            .await
            .map_err(SetpointError::device)?;
        let value = value_of(r, r.offset, &back).map_err(SetpointError::Refused)?;
        let expect = device::decode(r, &words).ok();
        let same = match (&expect, t.is_bits()) {
            (_, true) => {
                value.as_f64() == v.as_f64().or(v.as_bool().map(|b| f64::from(u8::from(b))))
            }
            (Some(e), false) => *e == value,
            (None, false) => false,
        };
        if !same {
            return Err(SetpointError::Mismatch(value));
        }
        Ok(value)
    }
}
