//! Modbus TCP and RTU through tokio-modbus, with a timeout on every call.

use std::time::Duration;

use tokio::time::timeout;
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::slave::Slave;

use crate::{DeviceError, FieldAdapter, Table, Words};

/// Largest read of registers in one request (the protocol's limit).
pub const MAX_REGISTERS: u16 = 125;
/// Largest read of bits in one request.
pub const MAX_BITS: u16 = 2000;

/// Serial parity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parity {
    /// None.
    None,
    /// Even.
    Even,
    /// Odd.
    Odd,
}

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

impl FieldAdapter for Modbus {
    async fn read(&mut self, table: Table, start: u16, count: u16) -> Result<Words, DeviceError> {
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

    async fn write(&mut self, table: Table, start: u16, words: &[u16]) -> Result<(), DeviceError> {
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

    fn reset(&mut self) {
        self.ctx = None;
    }
}
