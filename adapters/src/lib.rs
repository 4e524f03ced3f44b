//! Field adapters: how a node talks to the equipment in its cabinet.
//!
//! One [`FieldAdapter`] trait — read a range of one table, write a range —
//! and its Modbus implementation over TCP and RTU (serial, through
//! `tokio-serial`; no libudev); and [`opcua::OpcUa`], which reads and
//! writes variables by node id (OPC UA has no tables). Adapters move raw words and bits; what they
//! mean (types, swaps, scale) is the device profile's business, decoded by
//! the node with `crdt_state::device`. This crate depends on neither
//! `crdt-state` nor `mesh`.
//!
//! tokio-modbus has no timeouts of its own: every call here has one, and a
//! call that timed out or failed on the transport drops the connection, so
//! the next call reconnects (a late answer can never be taken for the
//! answer to a later request). Modbus exceptions (illegal address, busy,
//! device failure) are answers, not failures: the connection stays.

pub mod modbus;
pub mod opcua;

use std::future::Future;
use std::time::Duration;

/// A Modbus table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Whether it holds bits.
    pub fn is_bits(&self) -> bool {
        matches!(self, Table::Coils | Table::DiscreteInputs)
    }
}

/// What a read returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Words {
    /// Registers.
    Registers(Vec<u16>),
    /// Bits.
    Bits(Vec<bool>),
}

/// Why a device call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// No answer in time (the connection is dropped and remade).
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The device answered with a Modbus exception.
    #[error("Modbus exception {code:#04x} ({})", exception_name(*.code))]
    Exception {
        /// The exception code.
        code: u8,
    },
    /// It could not be reached.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The transport failed mid-call.
    #[error("transport: {0}")]
    Io(String),
    /// A request the protocol cannot carry.
    #[error("{0}")]
    Invalid(String),
    /// The device refused the request (an OPC UA bad status).
    #[error("refused: {0}")]
    Refused(String),
}

impl DeviceError {
    /// Whether the device itself answered (it is online).
    pub fn device_answered(&self) -> bool {
        matches!(
            self,
            DeviceError::Exception { .. } | DeviceError::Refused(_)
        )
    }
}

/// Words for people for a Modbus exception code.
pub fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}

/// One device's transport.
pub trait FieldAdapter: Send {
    /// Reads `count` registers or bits of `table` from `start`.
    fn read(
        &mut self,
        table: Table,
        start: u16,
        count: u16,
    ) -> impl Future<Output = Result<Words, DeviceError>> + Send;

    /// Writes registers (holding registers) or bits (coils, `0`/`1`) from `start`.
    fn write(
        &mut self,
        table: Table,
        start: u16,
        words: &[u16],
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Drops the connection (the next call reconnects).
    fn reset(&mut self);
}
